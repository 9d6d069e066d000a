"""The parts of latent_recall, value_correlation and truncation_curve that follow EleutherAI's study of
LLM-simulated encoders: the threshold curve, mode and mean values, the scored position, the candidate count,
the value prompt, fixed-count truncation, and their presets. Known answers on tiny cases."""

import json
import math

import numpy as np
import pytest
import torch

from saebench.errors import SaebenchError
from saebench.runner import RunConfig, evaluate
from saebench.tasks.names import resolve_task
from saebench.tasks.simulation import value_curves, value_pairs
from saebench.tasks.simulation_scoring import THRESHOLDS, pick_positions, threshold_curve
from saebench.tasks.truncation import truncate
from tests.conftest import save_tiny_topk_sae
from tests.unit.test_cli_errors import assert_clean_failure, run_cli


def _details(folder):
    return [json.loads(line) for line in next(folder.glob("*.details.jsonl")).read_text().splitlines()]


def test_a_simulator_that_knows_the_truth_has_recall_1_at_every_threshold():
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(5):
        y = rng.random(40) < 0.2
        y[0] = True
        answers.append((y, y.astype(float)))  # P(active) 1 on the active latents, 0 on the others
    rows = threshold_curve(answers, d_latent=1000)
    assert [r["x"] for r in rows] == list(THRESHOLDS) and {0.5, 0.99, 0.999} <= set(THRESHOLDS)
    for r in rows:
        assert r["recall"] == 1.0 and r["recall_se"] == 0.0
        if r["x"] > 0:  # above 0 nothing inactive passes: the dictionary-wide count is the true L0
            assert r["specificity"] == 1.0
            assert r["expected_active"] == pytest.approx(np.mean([y.sum() for y, _ in answers]))
    assert rows[0]["specificity"] == 0.0 and rows[0]["expected_active"] == 1000  # t = 0: everything


def test_the_threshold_curve_scales_false_positives_to_the_dictionary():
    y = np.array([True, False, False, False])
    p = np.array([0.6, 0.995, 0.3, 0.1])
    rows = {r["x"]: r for r in threshold_curve([(y, p)], d_latent=101, thresholds=(0.5, 0.99, 0.999))}
    # t = 0.5: one of three inactive candidates passes: 1 + 100 * (1/3) expected among the 101 latents
    assert rows[0.5]["recall"] == 1.0 and rows[0.5]["expected_active"] == pytest.approx(1 + 100 / 3)
    assert rows[0.99]["recall"] == 0.0 and rows[0.99]["expected_active"] == pytest.approx(100 / 3)
    assert rows[0.999]["specificity"] == 1.0 and rows[0.999]["expected_active"] == 0.0


class _Sample:
    """bin = the activation, quantile = activation / 10 (a stand-in for LatentSample)."""

    def bin_of(self, latent, a):
        return int(a)

    def quantile_of(self, latent, a):
        return a / 10


def test_mode_and_mean_of_a_hand_made_digit_distribution():
    from saebench.encoders.llm_sim import Simulation

    probs = torch.zeros(3, 10)
    probs[0, [0, 8, 9]] = torch.tensor([0.3, 0.35, 0.35])  # a tie: the mode is the lower digit, 8
    probs[1, 2] = 1.0
    probs[2] = float("nan")  # a failed answer
    means = (probs * torch.arange(10)).sum(1)
    sim = Simulation([torch.tensor([4, 5, 6])], [torch.tensor([7.0, 2.0, 5.0])], [torch.ones(3)], [means], 10, [0],
                     value_probs=[probs])
    arr, failed = value_pairs(sim, _Sample())
    assert failed == 1
    np.testing.assert_allclose(arr, [[0, 0.35 * 8 + 0.35 * 9, 8, 7, 0.7], [0, 2.0, 2, 2, 0.2]], rtol=1e-6)
    col = dict(zip(("prompt", "mean", "mode", "bin", "quantile"), arr.T))
    rows = value_curves(col)
    share = {(r["of"], r["x"]): r["share"] for r in rows if r["curve"] == "distribution"}
    assert share["predicted_mean", 6] == 0.5 and share["predicted_mode", 8] == 0.5  # mean 5.95 rounds to 6
    assert share["activation_bin", 7] == 0.5 and share["activation_decile", 2] == 0.5
    assert all(sum(share[k, x] for x in range(10)) == pytest.approx(1) for k, _ in share)
    by = {r["x"]: r for r in rows if r["curve"] == "by_predicted"}
    assert set(by) == {2, 8} and by[8]["bin_mean"] == 7 and by[8]["quantile_mean"] == pytest.approx(0.7)


class _PromptLLM:
    """Records the system prompts it is asked and answers a fixed digit distribution."""

    label = "fake"

    def __init__(self):
        from saebench.llm.base import LLMStats

        self.stats, self.systems, self.last_error = LLMStats(), [], ""

    def choice_probs(self, prompts, choices, desc=None):
        self.systems += [p.system for p in prompts]
        return [[0.1] * 10 for _ in prompts]


def test_the_value_prompt_is_the_one_asked_for():
    from saebench.explanations import Explanations
    from saebench.simulators import VALUE_ACTIVE_SYSTEM, VALUE_SYSTEM, LLMSimulator

    llm = _PromptLLM()
    sim = LLMSimulator(llm, Explanations({0: "numbers"}, "test"))
    assert sim.value_probs([("t <<x>>", 5, 0)], "active") == [[0.1] * 10]
    sim.value_probs([("t <<x>>", 5, 0)])
    assert llm.systems == [VALUE_ACTIVE_SYSTEM, VALUE_SYSTEM]
    assert "The feature is active on the marked token" in VALUE_ACTIVE_SYSTEM and "0 (not active)" in VALUE_SYSTEM


def test_position_last_is_each_contexts_last_scorable_token():
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 5] = False  # a document's BOS last: its last non-sink token instead
    keep[2] = False  # nothing scorable: the last position
    assert pick_positions(keep, "last", 0).tolist() == [5, 4, 5]
    drawn = pick_positions(keep, "random", 0)
    assert drawn[0] in range(1, 6) and drawn[1] in range(1, 5)


def test_recall_at_the_last_token_with_the_tasks_candidate_count(tiny_llama, tiny_sae_dir, tmp_path):
    config = RunConfig(output_dir=tmp_path / "runs", limit=5, context_len=32, progress=False)
    spec = f"llm_sim:sae:{tiny_sae_dir}?llm=rules"
    (rec,) = evaluate(tiny_llama, [spec], ["latent_recall?position=last&candidates=7"], config)
    assert rec.config["task"]["params"]["position"] == "last" and rec.config["task"]["params"]["candidates"] == "7"
    assert rec.extra["candidates"] == "7" and rec.encoder["params"]["options"]["candidates"] == "200"
    rows = _details(tmp_path / "runs" / "latent_recall")
    prompts = [r for r in rows if "prompt" in r]
    assert len(prompts) == 5 and all(r["position"] <= 31 for r in prompts)
    assert sum(r["position"] == 31 for r in prompts) >= 4  # the last token, unless it is a document's BOS
    # each position asked about its active latents and exactly 7 inactive ones
    assert rec.extra["encoder_report"]["candidates"] == sum(len(r["active"]) + 7 for r in prompts)
    curve = [r for r in rows if r.get("curve") == "threshold"]
    assert [r["x"] for r in curve] == list(THRESHOLDS) and "expected_active_se" in curve[0]


def test_value_correlation_reports_mode_and_mean_with_the_active_prompt(tiny_llama, tiny_sae_dir, tmp_path):
    config = RunConfig(output_dir=tmp_path / "runs", limit=6, progress=False)  # the preset's 32-token contexts
    spec = f"llm_sim:sae:{tiny_sae_dir}?llm=rules"
    (told,) = evaluate(tiny_llama, [spec], ["value_correlation_eleuther"], config)
    params = told.config["task"]["params"]
    assert (params["value_prompt"], params["position"], params["candidates"], params["context_len"]) == \
        ("active", "last", "0", 32)
    assert {"pearson_bin_mode", "pearson_quantile_mode", "pearson_bin"} <= set(told.metrics)
    rows = _details(tmp_path / "runs" / "value_correlation")
    dist = [r for r in rows if r.get("curve") == "distribution"]
    assert {r["of"] for r in dist} == {"predicted_mean", "predicted_mode", "activation_bin", "activation_decile"}
    pairs = [r for r in rows if "prompt" in r]
    assert pairs and all(0 <= r["mode"] <= 9 and r["mode"] == int(r["mode"]) for r in pairs)
    assert told.extra["curves"]["distribution"]["series"] == "of"


@pytest.mark.parametrize("task, said", [
    ("latent_recall?position=middle", "latent_recall parameter position='middle': choose random or last"),
    ("latent_recall?candidates=lots", "latent_recall parameter candidates='lots': give a count"),
    ("latent_recall?positions=1.5", "latent_recall parameter positions='1.5': give a whole number"),
    ("value_correlation?value_prompt=told", "value_prompt='told': choose default or active"),
    ("truncation_curve?keep=counts", "truncation_curve parameter keep='counts': choose fraction or count"),
    ("truncation_curve?keep=count&counts=0,2", "truncation_curve parameter counts='0': give a whole number"),
    ("truncation_curve?counts=1,2", "counts='1,2' applies to keep=count"),
])
def test_a_parameter_that_contradicts_its_type_is_one_line_exit_2(tiny_llama_dir, tiny_sae_dir, tmp_path, capsys,
                                                                   task, said):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"llm_sim:sae:{tiny_sae_dir}?llm=rules",
                         "--task", task, "--limit", "4", "--context-len", "32"], capsys, out)
    assert_clean_failure(code, err, out, said)


def test_the_presets_follow_the_sources_numbers():
    recall = resolve_task("latent_recall_eleuther").defaults
    assert (recall.context_len, recall.position, recall.candidates) == (32, "last", "1000")
    trunc = resolve_task("truncation_curve_eleuther").defaults
    assert (trunc.tokens, trunc.context_len, trunc.keep, trunc.counts) == (100 * 64, 64, "count", None)
    assert resolve_task("value_correlation_eleuther").value_prompt == "active"
    today = resolve_task("latent_recall").defaults  # today's presets stay as they were
    assert (today.context_len, today.position, today.candidates) == (64, "random", None)
    assert resolve_task("truncation_curve").defaults.keep == "fraction"


CODES = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0, 5.0],   # L0 4
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # L0 0
                      [0.0, -4.0, 0.0, 2.0, 0.0, 0.0]])  # L0 2, by magnitude


def test_a_fixed_count_keeps_that_many_or_all():
    assert truncate(CODES, None, "top", count=2).tolist() == [[0, 3, 0, 0, 0, 5], [0] * 6, [0, -4, 0, 2, 0, 0]]
    assert truncate(CODES, None, "top", count=1).tolist() == [[0, 0, 0, 0, 0, 5], [0] * 6, [0, -4, 0, 0, 0, 0]]
    assert torch.equal(truncate(CODES, None, "top", count=4), CODES)
    picked = truncate(CODES, None, "random", torch.Generator().manual_seed(3), count=3)
    assert (picked != 0).sum(1).tolist() == [3, 0, 2] and torch.all((picked == 0) | (picked == CODES))


def test_count_curve_reaches_the_full_sae_at_l0(tiny_llama, tmp_path):
    sae = f"sae:{save_tiny_topk_sae(tmp_path / 'sae', k=8)}"  # L0 8 at every spliced token; 64 latents
    config = RunConfig(output_dir=tmp_path / "runs", limit=256, context_len=32, progress=False)
    (rec,) = evaluate(tiny_llama, [sae], ["truncation_curve?keep=count"], config)
    assert rec.config["task"]["params"]["keep"] == "count" and rec.config["task"]["params"]["fractions"] == [0.1, 0.5, 1.0]
    assert rec.extra["counts"] == [1, 2, 4, 8]  # 16 ... 64 keep everything too: not shown
    assert rec.metrics["l0"] == pytest.approx(8)
    rows = [r for r in _details(tmp_path / "runs" / "truncation_curve") if r["curve"] == "count"]
    at = {(r["mode"], r["x"]): r for r in rows}
    for mode in ("top", "random"):
        assert at[mode, 8]["kl"] == rec.metrics["kl_full"]  # count >= L0: the full SAE, exactly
        assert at[mode, 2]["l0_kept"] == pytest.approx(2)
    assert at["top", 1]["kl"] != at["top", 4]["kl"] != rec.metrics["kl_full"]
    assert rec.metrics["kl_top_10pct"] is not None and math.isfinite(rec.metrics["kl_ratio_auc"])
    assert rec.extra["curves"]["count"]["scale"] == "log2"
    again = evaluate(tiny_llama, [sae], ["truncation_curve?keep=count&counts=3,100"],
                     RunConfig(output_dir=tmp_path / "again", limit=256, context_len=32, progress=False))[0]
    assert again.extra["counts"] == [3, 100]
    rows = {(r["mode"], r["x"]): r for r in _details(tmp_path / "again" / "truncation_curve") if r["curve"] == "count"}
    assert rows["random", 100]["kl"] == rows["top", 100]["kl"] == again.metrics["kl_full"] == rec.metrics["kl_full"]
    assert rows["top", 3]["l0_kept"] == pytest.approx(3) and rows["top", 3]["kl"] != rec.metrics["kl_full"]


def test_simulation_concat_keeps_value_probabilities():
    from saebench.encoders.llm_sim import Simulation

    one = [torch.tensor([1.0])]
    part = Simulation(one, one, one, one, 4, [0], value_probs=[torch.full((1, 10), 0.1)])
    both = Simulation.concat([part, part])
    assert len(both.value_probs) == 2 and both.skipped_active == [0, 0]
    assert Simulation.concat([Simulation(one, one, one, one, 4)]).value_probs is None  # values never asked


def test_candidates_are_all_or_a_count():
    from saebench.encoders.llm_sim_options import check_candidates

    assert check_candidates(1000, "x") == "1000" and check_candidates(" all", "x") == "all"
    assert check_candidates("007", "x") == "7"
    for bad in ("-1", "1.5", "some", True):
        with pytest.raises(SaebenchError, match="latent_recall parameter candidates="):
            check_candidates(bad, "latent_recall parameter")
