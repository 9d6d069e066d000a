"""truncation_curve: the truncation rule by hand, and the task end to end on a tiny model."""

import json

import pytest
import torch

from saebench.errors import SaebenchError
from saebench.leaderboard import write_leaderboards
from saebench.runner import RunConfig, evaluate
from saebench.tasks.truncation import TruncationCurveTask, truncate
from tests.conftest import save_tiny_topk_sae


def test_top_keeps_the_largest_and_random_keeps_exactly_ceil_f_l0():
    codes = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0, 5.0],   # L0 4
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # L0 0
                          [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # L0 2, a tie: the lower index wins
    assert truncate(codes, 0.5, "top").tolist() == [[0, 3, 0, 0, 0, 5], [0] * 6, [1, 0, 0, 0, 0, 0]]
    assert truncate(codes, 0.1, "top").tolist() == [[0, 0, 0, 0, 0, 5], [0] * 6, [1, 0, 0, 0, 0, 0]]  # ceil
    assert torch.equal(truncate(codes, 1.0, "top"), codes)
    for seed in range(5):
        a = truncate(codes, 0.5, "random", torch.Generator().manual_seed(seed))
        assert ((a != 0).sum(1)).tolist() == [2, 0, 1] and torch.all((a == 0) | (a == codes))
        assert torch.equal(a, truncate(codes, 0.5, "random", torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("fractions", ["0,0.5", "1.5", "x"])
def test_bad_fractions_are_one_clear_error(fractions):
    with pytest.raises(SaebenchError, match="truncation_curve fractions"):
        TruncationCurveTask(fractions=fractions)


@pytest.fixture
def tiny_sae_dir(tmp_path):
    return save_tiny_topk_sae(tmp_path / "sae", k=8)


def test_the_curve_end_to_end_and_its_full_point_is_ce_kl(tiny_llama, tiny_sae_dir, tmp_path):
    sae = f"sae:{tiny_sae_dir}"
    config = RunConfig(output_dir=tmp_path / "runs", limit=512, context_len=32, progress=False,
                       task_params={"fractions": "0.1,0.25,0.5,1"})
    trunc, ce = evaluate(tiny_llama, [sae], ["truncation_curve", "ce_kl"], config)
    assert trunc.metrics["kl_full"] == pytest.approx(ce.metrics["kl"], rel=1e-5)
    assert trunc.metrics["ce_clean"] == pytest.approx(ce.metrics["ce_clean"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "truncation_curve").glob("*.details.jsonl")
            .__next__().read_text().splitlines()]
    assert {(r["mode"], r["x"]) for r in rows} == {(m, f) for m in ("top", "random") for f in (0.1, 0.25, 0.5, 1.0)}
    kept = {(r["mode"], r["x"]): r["l0_kept"] for r in rows}
    assert kept[("top", 1.0)] == pytest.approx(8) and kept[("top", 0.5)] == pytest.approx(4)
    assert kept[("random", 0.25)] == pytest.approx(2) and kept[("top", 0.1)] == pytest.approx(1)
    written = write_leaderboards(tmp_path / "runs", tmp_path / "lb", task="truncation_curve")
    assert any(p.suffix == ".png" and "fraction" in p.name for p in (tmp_path / "lb").iterdir())
    assert any(p.name == "truncation_curve.md" for p in written)


def test_an_encoder_without_latents_is_refused(tiny_llama, tmp_path):
    config = RunConfig(output_dir=tmp_path / "runs", limit=64, context_len=32, progress=False)
    with pytest.raises(SaebenchError, match="'identity' has none"):
        evaluate(tiny_llama, ["identity"], ["truncation_curve"], config)
