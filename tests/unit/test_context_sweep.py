"""context_sweep: per-position metrics against an independent computation, buckets, safe_context, errors."""

import json

import pytest
import torch

from saebench import RunConfig, evaluate
from saebench.errors import SaebenchError
from saebench.splice import sink_mask
from saebench.stats import RangeMeans, ratio_and_se
from saebench.tasks.context_sweep import buckets, safe_context
from tests.unit.tiny_lm import ReluLatentEncoder

HOOKPOINT = "layers.1.resid_pre"


def test_buckets_are_log2_and_cover_every_position():
    assert buckets(1024) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255),
                             (256, 511), (512, 1023)]
    assert buckets(100)[-1] == (64, 99)


def test_safe_context_definition():
    spans = buckets(1024)
    flat = [0.1] * len(spans)
    assert safe_context(flat, spans, 1024) == 1024
    rising = [0.1] * 8 + [0.25, 3.0]  # 256-511 above 2 x 0.1: broken there
    assert safe_context(rising, spans, 1024) == 256
    assert safe_context([0.0] * len(spans), spans, 1024) == 1024  # exact: never broken
    tiny = [0.01] * 8 + [0.04, 0.04]  # below 2 x the 0.05-nat floor
    assert safe_context(tiny, spans, 1024) == 1024
    early = [0.1, 1.5] + [0.1] * 8  # >= 1 nat is broken even inside the baseline range
    assert safe_context(early, spans, 1024) == 2


def test_range_means_match_the_batch_ratio_estimator():
    gen = torch.Generator().manual_seed(0)
    values, weights = torch.randn(10, 8, generator=gen), (torch.rand(10, 8, generator=gen) > 0.3).double()
    member = torch.zeros(8, 2)
    member[:3, 0], member[3:, 1] = 1, 1
    acc = RangeMeans(8, member)
    acc.add(values[:4], weights[:4])
    acc.add(values[4:], weights[4:])  # streamed in two batches
    mean, se = acc.mean_se()
    for j, cols in enumerate((slice(0, 3), slice(3, 8))):
        a, c = (values * weights)[:, cols].sum(1), weights[:, cols].sum(1)
        want_mean, want_se = ratio_and_se(a[c > 0], c[c > 0])
        assert mean[j].item() == pytest.approx(want_mean) and se[j].item() == pytest.approx(want_se)


class _Encoder(ReluLatentEncoder):
    training_context = 16


def _sweep(model, encoders, tmp_path, max_len=48, sequences=5, **kw):
    from saebench.runner import _run_task, resolve_task

    config = RunConfig(limit=sequences, batch_size=2, output_dir=tmp_path, progress=False, reuse=False,
                       task_params={"max_len": max_len}, **kw)
    return _run_task(resolve_task("context_sweep", {"max_len": max_len}), model, {HOOKPOINT: encoders}, config)


def _details(rec, tmp_path, curve):
    path = next(tmp_path.rglob(rec.details_file))
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["curve"] == curve]


@torch.no_grad()
def test_per_position_dce_matches_an_independent_splice(tiny_llama, tmp_path):
    from saebench.corpus import CorpusSpec, long_sequences

    enc = _Encoder(tiny_llama.d_model, hookpoint=HOOKPOINT)
    rec_relu, rec_id = _sweep(tiny_llama, [enc, *_identity(tiny_llama)], tmp_path)
    rows = _details(rec_relu, tmp_path, "position")
    seqs = long_sequences(tiny_llama.tokenizer, CorpusSpec("wiki"), 48, 5, 0, tiny_llama.bos_id).tokens
    sinks = sink_mask(seqs, tiny_llama.bos_id)
    layer = tiny_llama.layers()[1]

    def splice(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        flat = h.reshape(-1, h.shape[-1])
        recon = enc.decode(enc.encode(flat, None)).to(h.dtype)
        out = torch.where(sinks.reshape(-1, 1), flat, recon).view_as(h)
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), seqs[:, 1:], reduction="none")

    clean = ce(tiny_llama.model(seqs).logits)
    handle = layer.register_forward_pre_hook(splice, with_kwargs=True)
    try:
        spliced = ce(tiny_llama.model(seqs).logits)
    finally:
        handle.remove()
    scored = ~sinks[:, :-1] & ~sinks[:, 1:]
    for p in (1, 5, 17, 40):
        want = (spliced - clean)[:, p][scored[:, p]].mean().item()
        assert rows[p]["dce"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert rows[0]["sink"] and rows[0]["n"] == 0  # BOS: excluded from every mean
    # summaries agree with the curve: within = positions 1..15, beyond = 16..46 (47 predicts nothing)
    n_pred = torch.tensor([r["n_pred"] for r in rows], dtype=torch.float64)
    dce = torch.tensor([r["dce"] or 0.0 for r in rows], dtype=torch.float64)
    assert rec_relu.metrics["dce_within"] == pytest.approx(((dce * n_pred)[1:16].sum() / n_pred[1:16].sum()).item())
    assert rec_relu.metrics["dce_beyond"] == pytest.approx(((dce * n_pred)[16:].sum() / n_pred[16:].sum()).item())
    assert rec_relu.metrics["training_context"] == 16 and rec_relu.stderr["dce_within"] > 0
    # identity: nothing lost anywhere, the full window is safe
    assert rec_id.metrics["dce"] == 0 and rec_id.metrics["kl"] == 0 and rec_id.metrics["safe_context"] == 48
    assert all(r["fve"] == pytest.approx(1.0) for r in _details(rec_id, tmp_path, "position")[1:])


def _identity(model):
    from saebench.encoders.baselines import IdentityEncoder

    return [IdentityEncoder(model.d_model, HOOKPOINT)]


def test_encoder_trained_longer_than_max_len_is_refused(tiny_llama, tmp_path):
    class Long(ReluLatentEncoder):
        training_context = 128

    with pytest.raises(SaebenchError, match="trained on 128-token contexts, longer than --max-len 48"):
        _sweep(tiny_llama, [Long(tiny_llama.d_model, hookpoint=HOOKPOINT)], tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_max_len_beyond_the_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="--max-len 300 is longer than model 'tiny-llama' supports"):
        evaluate(tiny_llama, ["identity"], ["context_sweep"],
                 RunConfig(output_dir=tmp_path, progress=False, task_params={"max_len": 300}))


def test_several_layers_in_one_run_share_one_table(tiny_llama, tmp_path):
    from saebench.cli import main

    recs = evaluate(tiny_llama, ["identity@layers.{0,1}.resid_post", "zero@layers.0.resid_post"], ["context_sweep"],
                    RunConfig(limit=3, output_dir=tmp_path / "runs", progress=False, task_params={"max_len": 40}))
    assert [(r.encoder["label"], r.hookpoint) for r in recs] == [
        ("identity", "layers.0.resid_post"), ("zero", "layers.0.resid_post"), ("identity", "layers.1.resid_post")]
    assert main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "context_sweep.md").read_text()
    assert md.count("## context_sweep v1") == 1 and "layers.1.resid_post" in md


def test_interrupted_sweep_resumes_to_the_same_numbers(tiny_llama, tmp_path, monkeypatch):
    from saebench.tasks import context_sweep as cs

    def encoders():
        return [_Encoder(tiny_llama.d_model, hookpoint=HOOKPOINT)]

    (whole,) = _sweep(tiny_llama, encoders(), tmp_path / "whole")
    monkeypatch.setattr(cs, "CHECKPOINT_SECONDS", -1.0)  # save after every batch
    real, calls = cs.ContextSweepTask._batch, []

    def flaky(self, ctx, subs, head, batch, rows, state):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, ctx, subs, head, batch, rows, state)

    monkeypatch.setattr(cs.ContextSweepTask, "_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_llama, encoders(), tmp_path / "cut")
    (resumed,) = _sweep(tiny_llama, encoders(), tmp_path / "cut")
    assert len(calls) == 1 + 1 + 2  # 3 batches of 2, 2, 1 sequences: the rerun starts at the second
    assert resumed.metrics == whole.metrics and resumed.stderr == whole.stderr
    assert _details(resumed, tmp_path / "cut", "bucket") == _details(whole, tmp_path / "whole", "bucket")
