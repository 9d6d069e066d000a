"""truncation_curve: the truncation rule by hand, and the task on a tiny random-weight Llama."""

import json

import pytest
import torch

from saebench import cli
from saebench.encoders.base import LATENTS, EncodeContext, Encoder, EncoderSpec, SparseCodes, dense
from saebench.errors import SaebenchError
from saebench.runner import RunConfig, _run_task, evaluate, resolve_task
from saebench.tasks.truncation import TruncationCurveTask, truncate
from tests.conftest import save_tiny_topk_sae

HOOKPOINT = "layers.1.resid_pre"

CODES = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0, 5.0],   # L0 4
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # L0 0
                      [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],   # L0 2, a tie: the lower index wins
                      [0.0, -4.0, 0.0, 2.0, 0.0, 0.0]])  # by magnitude: -4 is the largest


def test_top_keeps_the_largest_dense():
    assert truncate(CODES, 0.5, "top").tolist() == [[0, 3, 0, 0, 0, 5], [0] * 6, [1, 0, 0, 0, 0, 0],
                                                    [0, -4, 0, 0, 0, 0]]
    # ceil(0.1 * L0): one latent wherever any is active
    assert truncate(CODES, 0.1, "top").tolist() == [[0, 0, 0, 0, 0, 5], [0] * 6, [1, 0, 0, 0, 0, 0],
                                                    [0, -4, 0, 0, 0, 0]]
    assert truncate(CODES, 0.75, "top").tolist() == [[0, 3, 0, 2, 0, 5], [0] * 6, [1, 1, 0, 0, 0, 0],
                                                     [0, -4, 0, 2, 0, 0]]
    assert torch.equal(truncate(CODES, 1.0, "top"), CODES)


def test_top_on_sparse_codes_sums_repeated_indices_first():
    # row 0: latent 2 listed twice (0.5 + 3.0 = 3.5 > 3.0 of latent 4); row 1: no active latent
    codes = SparseCodes(torch.tensor([[2, 4, 2, 1], [0, 3, 0, 3]]),
                        torch.tensor([[0.5, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), d_latent=6)
    out = truncate(codes, 1 / 3, "top")
    assert isinstance(out, SparseCodes)
    assert dense(out).tolist() == [[0, 0, 3.5, 0, 0, 0], [0] * 6]  # L0 3 -> keep 1
    assert dense(truncate(codes, 0.5, "top")).tolist() == [[0, 0, 3.5, 0, 3.0, 0], [0] * 6]
    assert torch.equal(dense(truncate(codes, 1.0, "top")), dense(codes))


def test_kept_count_forgives_float_rounding():
    codes = torch.arange(1.0, 51.0)[None]  # L0 50; 0.14 * 50 = 7.000000000000001 in floating point
    assert int((truncate(codes, 0.14, "top") != 0).sum()) == 7
    assert (truncate(codes, 0.14, "top") != 0).nonzero()[:, 1].tolist() == list(range(43, 50))


def test_random_keeps_exactly_ceil_f_l0_deterministically():
    picks = set()
    for seed in range(20):
        a = truncate(CODES, 0.5, "random", torch.Generator().manual_seed(seed))
        assert (a != 0).sum(1).tolist() == [2, 0, 1, 1]
        assert torch.all((a == 0) | (a == CODES))
        assert torch.equal(a, truncate(CODES, 0.5, "random", torch.Generator().manual_seed(seed)))
        picks.add(tuple((a[0] != 0).nonzero().squeeze(1).tolist()))
    assert len(picks) > 1  # not the top (or any fixed) subset


@pytest.mark.parametrize("fractions", ["0,0.5", "1.5", "x", "", [0.5, "y"], [-0.1]])
def test_bad_fractions_are_one_clear_error(fractions):
    with pytest.raises(SaebenchError, match="truncation_curve fractions") as err:
        TruncationCurveTask(fractions=fractions)
    assert "\n" not in str(err.value)


def test_metric_fractions_are_always_evaluated():
    assert TruncationCurveTask(fractions="0.3, 0.2").defaults.fractions == (0.1, 0.2, 0.3, 0.5, 1.0)


class CoordinateEncoder(Encoder):
    """The activation's coordinates as latents (codes = x, recon = codes): keeping the largest |x_i|
    is the best L2 approximation with that many coordinates, so 'top' must beat 'random'."""

    capabilities = frozenset({LATENTS})

    def __init__(self, d: int, sparse: bool = False):
        self.spec = EncoderSpec("coords_sparse" if sparse else "coords", None, None, d, d)
        self.sparse = sparse

    @classmethod
    def from_arg(cls, arg, build):
        return cls(build.model.d_model)

    def encode(self, acts, context: EncodeContext):
        x = acts.float()
        if not self.sparse:
            return x
        idx = torch.arange(x.shape[1], device=x.device).repeat(len(x), 2)  # every latent listed twice, halves
        return SparseCodes(idx, torch.cat([x / 2, x / 2], 1), x.shape[1])

    def decode(self, codes):
        assert isinstance(codes, SparseCodes) == self.sparse  # truncated codes come in the form encode gives
        return dense(codes)


def test_top_beats_random_and_sparse_codes_give_the_same_curve(tiny_llama, tmp_path):
    task = resolve_task("truncation_curve", {"fractions": "0.1,0.25,0.5,1"})
    config = RunConfig(limit=256, context_len=32, output_dir=tmp_path / "runs", progress=False)
    recs = _run_task(task, tiny_llama, {HOOKPOINT: [CoordinateEncoder(32), CoordinateEncoder(32, sparse=True)]},
                     config)
    dense_rec, sparse_rec = recs
    m = dense_rec.metrics
    assert m["kl_full"] == pytest.approx(0, abs=1e-6)  # every coordinate kept: x itself
    assert m["kl_top_10pct"] < m["kl_random_10pct"] and m["kl_top_50pct"] < m["kl_random_50pct"]
    assert m["kl_ratio_auc"] > 1
    for name, value in m.items():  # the same latents after summing the repeated indices
        assert sparse_rec.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    again = _run_task(task, tiny_llama, {HOOKPOINT: [CoordinateEncoder(32)]},
                      RunConfig(limit=256, context_len=32, output_dir=tmp_path / "again", progress=False))[0]
    assert again.metrics == m  # the random subsets are drawn from the seed


def test_the_curve_end_to_end_its_full_point_is_ce_kl_and_it_plots(tiny_llama, tmp_path):
    sae = f"sae:{save_tiny_topk_sae(tmp_path / 'sae', k=8)}"
    config = RunConfig(output_dir=tmp_path / "runs", limit=512, context_len=32, progress=False,
                       task_params={"fractions": "0.1,0.25,0.5,1"})
    trunc, ce = evaluate(tiny_llama, [sae], ["truncation_curve", "ce_kl"], config)
    assert trunc.metrics["kl_full"] == pytest.approx(ce.metrics["kl"], rel=1e-5)
    assert trunc.stderr["kl_full"] == pytest.approx(ce.stderr["kl"], rel=1e-4)
    assert trunc.metrics["ce_clean"] == pytest.approx(ce.metrics["ce_clean"], rel=1e-5)
    assert trunc.n["kl_top_10pct"] == ce.n["kl"]
    details = next((tmp_path / "runs" / "truncation_curve").glob("*.details.jsonl"))
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert {(r["curve"], r["mode"], r["x"]) for r in rows} == {("fraction", m, f) for m in ("top", "random")
                                                               for f in (0.1, 0.25, 0.5, 1.0)}
    kept = {(r["mode"], r["x"]): r["l0_kept"] for r in rows}  # a TopK SAE: L0 8 at every token
    assert kept[("top", 1.0)] == pytest.approx(8) and kept[("top", 0.5)] == pytest.approx(4)
    assert kept[("random", 0.25)] == pytest.approx(2) and kept[("top", 0.1)] == pytest.approx(1)
    full = {r["mode"]: r["kl"] for r in rows if r["x"] == 1.0}
    assert full["top"] == full["random"] == trunc.metrics["kl_full"]
    assert trunc.extra["curves"]["fraction"]["series"] == "mode"
    assert cli.main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb"),
                     "--task", "truncation_curve"]) == 0
    pngs = [p for p in (tmp_path / "lb").iterdir() if p.suffix == ".png" and "fraction" in p.name]
    assert pngs and pngs[0].stat().st_size > 10_000
    assert pngs[0].name in (tmp_path / "lb" / "truncation_curve.md").read_text()


def test_an_encoder_without_latents_is_refused(tiny_llama, tmp_path):
    config = RunConfig(output_dir=tmp_path / "runs", limit=64, context_len=32, progress=False)
    with pytest.raises(SaebenchError, match="'identity' has none.*sae:default") as err:
        evaluate(tiny_llama, ["identity"], ["truncation_curve"], config)
    assert "\n" not in str(err.value)
