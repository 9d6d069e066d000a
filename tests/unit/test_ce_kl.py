"""ce_kl known answers on a tiny random-weight Llama."""

import json
import math

import pytest

from saebench import RunConfig, evaluate
from saebench.encoders.base import BuildContext, EncodeContext, Encoder, EncoderSpec
from saebench.splice import sink_mask
from saebench.tasks.base import EvalText, RunSettings, TaskContext
from saebench.corpus import CorpusSpec


def run(model, encoders, tmp_path, **kw):
    config = RunConfig(limit=kw.pop("limit", 512), context_len=32, output_dir=tmp_path / "runs", progress=False, **kw)
    return {r.encoder["label"]: r for r in evaluate(model, encoders, ["ce_kl"], config)}


def test_identity_recovers_everything_and_zero_nothing(tiny_llama, tmp_path):
    recs = run(tiny_llama, ["identity", "zero", "mean"], tmp_path)
    ident, zero, mean = recs["identity"].metrics, recs["zero"].metrics, recs["mean"].metrics
    assert abs(ident["ce_loss_recovered"] - 1) < 1e-6
    assert ident["kl"] < 1e-8
    assert ident["fve"] == pytest.approx(1.0, abs=1e-6) and ident["mse"] == 0 and ident["cos"] == pytest.approx(1.0)
    assert abs(zero["ce_loss_recovered"]) < 1e-6
    assert abs(mean["ce_loss_recovered_mean_abl"]) < 1e-6
    assert mean["fve"] == pytest.approx(0.0, abs=1e-4)  # the mean explains no variance
    assert ident["l0"] is None and recs["identity"].stderr["l0"] is None  # no latents: null, not a sentinel
    assert ident["ce_clean"] == zero["ce_clean"] == ident["ce_spliced"]
    assert zero["ce_spliced"] == zero["ce_zero"]
    n = recs["identity"].n
    assert n["ce_loss_recovered"] == n["kl"] == _scored_predictions(tiny_llama, 512, 32)
    assert n["fve"] == n["mse"] == _scored_activations(tiny_llama, 512, 32)


def _contexts(model, limit, ctx_len):
    return EvalText(model, RunSettings()).contexts(limit, ctx_len)


def _scored_predictions(model, limit, ctx_len):
    """Predictions from a non-sink position whose target is not BOS, counted one by one."""
    bos = model.bos_id
    return sum(1 for row in _contexts(model, limit, ctx_len).tolist() for t in range(1, ctx_len - 1)
               if row[t] != bos and row[t + 1] != bos)


def _scored_activations(model, limit, ctx_len):
    bos = model.bos_id
    return sum(1 for row in _contexts(model, limit, ctx_len).tolist() for t in range(1, ctx_len) if row[t] != bos)


class HalfEncoder(Encoder):
    """x -> x / 2 through a 'latent' copy of x: closed-form MSE, cosine, FVE."""

    capabilities = frozenset({"latents"})

    def __init__(self, d):
        self.spec = EncoderSpec("half", None, None, d, d)

    @classmethod
    def from_arg(cls, arg, build: BuildContext):
        return cls(build.model.d_model)

    def encode(self, acts, context: EncodeContext):
        return acts / 2

    def decode(self, codes):
        return codes


def test_metrics_match_hand_computation(tiny_llama, tmp_path):
    from saebench.runner import _run_task, resolve_task

    enc = HalfEncoder(32)
    config = RunConfig(limit=256, context_len=32, output_dir=tmp_path, progress=False)
    rec = _run_task(resolve_task("ce_kl"), tiny_llama, {"layers.1.resid_pre": [enc]}, config)[0]
    # hand computation on the same tokens
    ctx = TaskContext.create(tiny_llama, "layers.1.resid_pre", RunSettings())
    toks = ctx.text.contexts(256, 32)
    x = ctx.hook.capture(toks).double()[~sink_mask(toks, tiny_llama.bos_id)]
    err = x / 2
    assert rec.metrics["mse"] == pytest.approx(((err**2).sum(1) / 32).mean().item(), rel=1e-5)
    assert rec.metrics["cos"] == pytest.approx(1.0, abs=1e-6)
    fve = 1 - (err**2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert rec.metrics["fve"] == pytest.approx(fve.item(), rel=1e-5)
    nonzero = (x != 0).sum(1).double()
    assert rec.metrics["l0"] == pytest.approx(nonzero.mean().item())
    assert rec.metrics["l1"] == pytest.approx((x.abs() / 2).sum(1).mean().item(), rel=1e-5)
    assert rec.metrics["dead_frac"] == 0.0 and rec.metrics["dense_1e-2"] == 32
    assert rec.n["fve"] == len(x)
    assert all(math.isfinite(v) for v in rec.stderr.values() if v is not None)


def test_records_are_written_and_reused(tiny_llama, tmp_path):
    first = run(tiny_llama, ["identity"], tmp_path)["identity"]
    files = list((tmp_path / "runs" / "ce_kl").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    for key in ("schema_version", "task", "encoder", "model", "config_hash", "saebench_version", "git_sha",
                "metrics", "stderr", "n", "seconds", "seed"):
        assert key in data
    assert data["task"]["name"] == "ce_kl" and data["task"]["version"] == 2 and data["task"]["headline"] == "ce_loss_recovered"
    mtime = files[0].stat().st_mtime_ns
    second = run(tiny_llama, ["identity", "zero"], tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    assert second["identity"].metrics == first.metrics
    other_seed = run(tiny_llama, ["identity"], tmp_path, seed=1)["identity"]
    assert other_seed.config_hash != first.config_hash


class CountingIdentity(Encoder):
    calls = 0
    fail_at: int | None = None

    def __init__(self, d):
        self.spec = EncoderSpec("counting", None, None, d, None)

    @classmethod
    def from_arg(cls, arg, build):
        return cls(build.model.d_model)

    def encode(self, acts, context):
        type(self).calls += 1
        if self.fail_at is not None and type(self).calls == self.fail_at:
            raise KeyboardInterrupt
        return acts

    def decode(self, codes):
        return codes


def test_interrupted_run_resumes_without_recomputing(tiny_llama, tmp_path, monkeypatch):
    from saebench.runner import _run_task, resolve_task
    from saebench.tasks import ce_kl

    monkeypatch.setattr(ce_kl, "CHECKPOINT_SECONDS", 0.0)  # checkpoint after every batch
    config = RunConfig(limit=32 * 8 * 4, context_len=32, batch_size=8, output_dir=tmp_path / "a", progress=False)
    task = resolve_task("ce_kl")
    CountingIdentity.calls, CountingIdentity.fail_at = 0, 3  # dies in the third of four batches
    with pytest.raises(KeyboardInterrupt):
        _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]}, config)
    assert not list((tmp_path / "a").rglob("*.json"))  # no half-written record
    CountingIdentity.calls, CountingIdentity.fail_at = 0, None
    resumed = _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]}, config)[0]
    assert CountingIdentity.calls == 2  # batches 1-2 were not recomputed
    assert not list((tmp_path / "a").rglob("*.pt"))  # partial state cleared once the record exists
    fresh = _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]},
                      RunConfig(limit=32 * 8 * 4, context_len=32, output_dir=tmp_path / "b", progress=False))[0]
    assert resumed.metrics == fresh.metrics


def test_a_rerun_with_another_batch_size_does_not_misread_the_checkpoint(tiny_llama, tmp_path, monkeypatch):
    from saebench.runner import _run_task, resolve_task
    from saebench.tasks import ce_kl

    monkeypatch.setattr(ce_kl, "CHECKPOINT_SECONDS", 0.0)
    task = resolve_task("ce_kl")

    def config(out, batch):
        return RunConfig(limit=32 * 8 * 4, context_len=32, batch_size=batch, output_dir=tmp_path / out, progress=False,
                         cache_references=False)

    CountingIdentity.calls, CountingIdentity.fail_at = 0, 3  # two of four 8-context batches checkpointed
    with pytest.raises(KeyboardInterrupt):
        _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]}, config("a", 8))
    CountingIdentity.calls, CountingIdentity.fail_at = 0, None
    resumed = _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]}, config("a", 4))[0]
    assert CountingIdentity.calls == 8  # all eight 4-context batches: the 8-context checkpoint was not used
    fresh = _run_task(task, tiny_llama, {"layers.1.resid_pre": [CountingIdentity(32)]}, config("b", 4))[0]
    assert resumed.metrics == fresh.metrics


def test_a_corpus_shorter_than_asked_is_a_warning_kept_in_the_record(tiny_llama, tmp_path, monkeypatch, capsys):
    from saebench.tasks import context as base

    real = base.token_contexts

    def short(tokenizer, spec, context_len, n_tokens, seed, bos_id):
        return real(tokenizer, spec, context_len, n_tokens, seed, bos_id)[:2]  # as if the split ran out

    monkeypatch.setattr(base, "token_contexts", short)
    rec = run(tiny_llama, ["identity"], tmp_path, limit=32 * 8)["identity"]
    assert "fewer than the 256 asked for" in capsys.readouterr().err
    assert any("fewer than the 256 asked for" in w for w in rec.extra["warnings"])
    assert rec.extra["contexts"] == 2 and rec.n["fve"] == _scored_activations_of(real, tiny_llama)


def _scored_activations_of(draw, model):
    tokens = draw(model.tokenizer, CorpusSpec(), 32, 32 * 8, 0, model.bos_id)[:2]
    return int((tokens[:, 1:] != model.bos_id).sum())
