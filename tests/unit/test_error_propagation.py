"""error_propagation: exact zeros for an exact source, MSE change against plain torch hooks, errors, heatmaps."""

import json

import pytest
import torch

from saebench import RunConfig, evaluate
from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.baselines import IdentityEncoder
from saebench.errors import SaebenchError
from saebench.splice import sink_mask
from tests.unit.tiny_lm import ReluLatentEncoder

MAX_LEN = 32
SEQUENCES = 5
L0_POST, L1_PRE, L1_MLP, L1_POST = ("layers.0.resid_post", "layers.1.resid_pre", "layers.1.mlp_out",
                                    "layers.1.resid_post")


def _run(model, groups, tmp_path, **kw):
    from saebench.runner import _run_task, resolve_task

    config = RunConfig(limit=SEQUENCES, batch_size=2, output_dir=tmp_path, progress=False, reuse=False, **kw)
    return _run_task(resolve_task("error_propagation", {"max_len": MAX_LEN}), model, groups, config)


def _details(rec, tmp_path):
    path = next(tmp_path.rglob(rec.details_file))
    return {row["x"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_exact_source_changes_nothing(tiny_llama, tmp_path):
    d = tiny_llama.d_model
    groups = {L0_POST: [IdentityEncoder(d, L0_POST)], L1_POST: [ReluLatentEncoder(d, hookpoint=L1_POST)]}
    (rec,) = _run(tiny_llama, groups, tmp_path)
    assert rec.encoder["label"] == "identity" and rec.hookpoint == L0_POST
    for q in ("mse", "l0", "norm"):
        for where in ("next", "last"):
            assert rec.metrics[f"{q}_change_{where}"] == 0.0 and rec.stderr[f"{q}_change_{where}"] == 0.0
    assert rec.n["mse_change_next"] == SEQUENCES * (MAX_LEN - 1)  # positions 1..N-1 of each context
    row = _details(rec, tmp_path)[f"relu_test @ {L1_POST}"]
    assert row["mse_clean"] == row["mse_spliced"] > 0 and row["l0_clean"] == row["l0_spliced"] > 0


@torch.no_grad()
def test_changes_match_plain_torch_hooks(tiny_llama, tmp_path):
    d = tiny_llama.d_model
    src, tgt = ReluLatentEncoder(d, hookpoint=L0_POST), ReluLatentEncoder(d, hookpoint=L1_POST)
    groups = {L1_POST: [tgt], L1_MLP: [ReluLatentEncoder(d, hookpoint=L1_MLP)],  # given out of forward order
              L0_POST: [src], L1_PRE: [IdentityEncoder(d, L1_PRE)]}
    recs = _run(tiny_llama, groups, tmp_path)
    assert [(r.encoder["label"], r.hookpoint) for r in recs] == [("relu_test", L0_POST), ("identity", L1_PRE),
                                                                 ("relu_test", L1_MLP)]
    rec = recs[0]
    assert rec.extra["next"] == f"identity@{L1_PRE}" and rec.extra["last"] == f"relu_test@{L1_POST}"

    # independently: splice the source into layer 0's output at non-sink positions, read layer 1's output
    seqs = token_contexts(tiny_llama.tokenizer, CorpusSpec("wiki"), MAX_LEN, SEQUENCES * MAX_LEN, 0, tiny_llama.bos_id)
    scored = ~sink_mask(seqs, tiny_llama.bos_id)
    layers = tiny_llama.layers()

    def hidden(out):
        return out if isinstance(out, torch.Tensor) else out[0]

    def splice(module, args, out):
        h = hidden(out)
        recon = src.decode(src.encode(h.reshape(-1, d), None)).view_as(h).to(h.dtype)
        new = torch.where(scored[..., None], recon, h)
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    def outputs(with_splice: bool) -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        handles = [layers[0].register_forward_hook(splice)] if with_splice else []  # runs before the reads
        handles += [layer.register_forward_hook(lambda m, a, o: seen.append(hidden(o))) for layer in layers[:2]]
        try:
            tiny_llama.model(seqs)
        finally:
            for handle in handles:
                handle.remove()
        return seen[0], seen[1]  # layer 0's output (after any splice), layer 1's output

    (pre_clean, post_clean), (pre_spliced, post_spliced) = outputs(False), outputs(True)

    def mse_sum(x):
        x = x[scored]  # (tokens, d): non-sink positions 1..N-1
        return ((x - tgt.decode(tgt.encode(x, None))) ** 2).mean(1).double().sum()

    want = (mse_sum(post_spliced) / mse_sum(post_clean) - 1).item()
    assert rec.metrics["mse_change_last"] == pytest.approx(want, rel=1e-5)
    assert rec.metrics["mse_change_last"] != 0 and rec.stderr["mse_change_last"] > 0  # a random dictionary: any sign
    # layers.1.resid_pre is the spliced activation itself: its norm change is the splice's own
    norms = [x[scored].norm(dim=-1).double().sum() for x in (pre_spliced, pre_clean)]
    assert rec.metrics["norm_change_next"] == pytest.approx((norms[0] / norms[1] - 1).item(), rel=1e-5)
    assert rec.metrics["l0_change_next"] is None and rec.n["l0_change_next"] is None  # identity: no latents
    assert rec.metrics["mse_change_next"] is None  # identity reconstructs exactly: no clean MSE to compare with
    rows = _details(rec, tmp_path)
    assert list(rows) == [f"identity @ {L1_PRE}", f"relu_test @ {L1_MLP}", f"relu_test @ {L1_POST}"]
    assert rows[f"relu_test @ {L1_MLP}"]["mse_change"] != 0 and rows[f"relu_test @ {L1_MLP}"]["l0_change"] != 0


def test_one_hookpoint_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="needs encoders at two or more hookpoints"):
        evaluate(tiny_llama, ["identity@layers.0.resid_post", "zero@layers.0.resid_post"], ["error_propagation"],
                 RunConfig(limit=2, output_dir=tmp_path, progress=False))
    assert not list(tmp_path.rglob("*.json"))


def test_max_len_beyond_the_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="--max-len 300 is longer than model 'tiny-llama' supports"):
        evaluate(tiny_llama, ["identity@layers.{0,1}.resid_post"], ["error_propagation"],
                 RunConfig(output_dir=tmp_path, progress=False, task_params={"max_len": 300}))


def test_interrupted_run_resumes_to_the_same_numbers(tiny_llama, tmp_path, monkeypatch):
    from saebench.tasks import error_propagation as ep

    d = tiny_llama.d_model

    def groups():
        return {L0_POST: [ReluLatentEncoder(d, hookpoint=L0_POST)], L1_POST: [ReluLatentEncoder(d, hookpoint=L1_POST)]}

    (whole,) = _run(tiny_llama, groups(), tmp_path / "whole")
    monkeypatch.setattr(ep, "CHECKPOINT_SECONDS", -1.0)  # save after every batch
    real, calls = ep.ErrorPropagationTask._batch, []

    def flaky(self, *args):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(ep.ErrorPropagationTask, "_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, groups(), tmp_path / "cut")
    (resumed,) = _run(tiny_llama, groups(), tmp_path / "cut")
    assert [c.start for c in calls] == [0, 2, 2, 4]  # the second run started at the unfinished batch
    assert resumed.metrics == whole.metrics and resumed.stderr == whole.stderr


def test_leaderboard_draws_heatmaps(tiny_llama, tmp_path):
    from saebench.cli import main

    recs = evaluate(tiny_llama, ["identity@layers.{0,1}.resid_post", "zero@layers.0.resid_post"],
                    ["error_propagation"],
                    RunConfig(limit=3, output_dir=tmp_path / "runs", progress=False, task_params={"max_len": MAX_LEN}))
    assert [(r.encoder["label"], r.hookpoint) for r in recs] == [("identity", L0_POST), ("zero", L0_POST)]
    assert recs[0].metrics["norm_change_next"] == 0.0 and recs[1].metrics["norm_change_next"] != 0.0
    assert main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "lb").rglob("*.png"))
    assert any(name.endswith("downstream-norm_change.png") for name in pngs), pngs
    assert "error_propagation" in (tmp_path / "lb" / "error_propagation.md").read_text()
