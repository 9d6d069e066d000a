"""The synthetic task (no language model) and the encoder zoo on a (tiny) model: records, FLOPs, bad input."""

import json
import math

import pytest
import torch

from saebench.errors import SaebenchError
from saebench.leaderboard import write_leaderboards
from saebench.runner import RunConfig, evaluate, resolve_task
from saebench.tasks.synthetic import SyntheticConfig, make_problem, matched_mcc
from saebench.tasks.synthetic_plots import cs_min_measurements, cs_recoverable, write_figures
from tests.unit.test_cli_errors import assert_clean_failure, run_cli


def test_matched_mcc_known_answers():
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(500, 6, generator=gen)
    assert matched_mcc(S, S) == pytest.approx(1.0)
    shuffled = S[:, [3, 1, 5, 0, 2, 4]] * torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0, -2.0])
    assert matched_mcc(S, shuffled) == pytest.approx(1.0)  # order, scale and sign do not matter
    assert matched_mcc(S, torch.randn(500, 6, generator=gen)) < 0.2
    assert matched_mcc(S, torch.zeros(500, 6)) == 0.0  # dead latents correlate 0
    assert matched_mcc(S, S[:, :3]) == pytest.approx(0.5)  # unmatched sources count 0


def test_problem_has_exactly_k_active_sources_and_unit_atoms():
    cfg = SyntheticConfig(n_sources=10, n_measurements=4, k_active=3, train_samples=50, test_samples=20)
    data = make_problem(cfg, seed=1)
    assert ((data["S_train"] != 0).sum(1) == 3).all() and (data["S_train"] >= 0).all()
    torch.testing.assert_close(data["D"].norm(dim=1), torch.ones(10))
    torch.testing.assert_close(data["X_test"], data["S_test"] @ data["D"])
    assert not torch.equal(make_problem(cfg, seed=2)["D"], data["D"])


def test_synthetic_runs_without_a_model_and_ito_beats_the_linear_sae_on_the_known_dictionary(tmp_path):
    out = tmp_path / "runs"
    config = RunConfig(output_dir=out, progress=False)
    task = "synthetic?seeds=2&steps=400&regimes=known_dict,unknown&train_samples=512&test_samples=512"
    recs = evaluate(None, ["linear_sae", "ito", "sparse_coding?steps=100", "mlp?hidden=16"], [task], config)
    by = {r.encoder["label"]: r for r in recs}
    assert set(by) == {"linear_sae", "ito", "sparse_coding?steps=100", "mlp?hidden=16"}
    for rec in recs:
        assert rec.model is None and rec.hookpoint is None and rec.config["task"]["params"]["steps"] == 400
        assert rec.n["latent_mcc_known_dict"] == 2 and rec.metrics["latent_mcc_known_codes"] is None
    assert by["ito"].metrics["latent_mcc_known_dict"] > by["linear_sae"].metrics["latent_mcc_known_dict"] + 0.1
    assert by["ito"].metrics["l0_known_dict"] == pytest.approx(3.0, abs=0.05)  # k = K
    assert by["linear_sae"].metrics["dict_mcc_known_dict"] == pytest.approx(1.0)  # the given dictionary
    assert by["linear_sae"].metrics["encode_flops"] == 2 * 8 * 16
    md = (tmp_path / "lb" / "synthetic.md")
    write_leaderboards(out, tmp_path / "lb")
    text = md.read_text()
    assert "no language model" in text and "hookpoint" not in text
    again = evaluate(None, ["linear_sae"], [task], config)  # the finished record is reused
    assert again[0].config_hash == by["linear_sae"].config_hash and again[0].created == by["linear_sae"].created


def test_synthetic_grid_draws_the_mcc_gap(tmp_path):
    out = tmp_path / "runs"
    task = "synthetic?seeds=2&steps=50&regimes=known_dict&train_samples=64&test_samples=64&grid=8,4,2;12,6,2"
    recs = evaluate(None, ["linear_sae", "ito"], [task], RunConfig(output_dir=out, progress=False))
    details = [json.loads(line) for line in (out / "synthetic" / recs[1].details_file).read_text().splitlines()]
    gaps = [d for d in details if d.get("curve") == "grid"]
    assert [g["x"] for g in gaps] == ["N=16 M=8 K=3 ✓", "N=8 M=4 K=2 ✓", "N=12 M=6 K=2 ✓"]
    assert [g["cs_recoverable"] for g in gaps] == [True, True, True]
    baseline = [json.loads(line) for line in (out / "synthetic" / recs[0].details_file).read_text().splitlines()]
    assert {d["mcc_gap_known_dict"] for d in baseline if d.get("curve") == "grid"} == {0.0}  # sae against itself
    written = write_leaderboards(out, tmp_path / "lb")
    assert any(p.name.endswith("mcc_gap_known_dict.png") for p in written)
    figures = write_figures(out, tmp_path / "figures")  # the 002-style grid with the compressed-sensing boundary
    assert [p.name.split("-")[-1] for p in figures] == ["known_dict.png"] and figures[0].stat().st_size > 0


def test_compressed_sensing_boundary_known_values():
    assert cs_min_measurements(16, 3) == pytest.approx(3 * math.log(16 / 3))  # 5.02
    assert cs_min_measurements(16, 16) == 0.0
    assert cs_recoverable(16, 8, 3) and not cs_recoverable(16, 4, 3)
    assert not cs_recoverable(64, 8, 3) and cs_recoverable(64, 16, 3)  # 3 ln(64/3) = 9.18
    assert not cs_recoverable(16, 8, 3, constant=2.0)  # 10.04 measurements asked for


def test_known_codes_loss_is_applied_and_recorded(tmp_path):
    base = "synthetic?seeds=1&steps=150&regimes=known_codes&train_samples=128&test_samples=128"
    config = RunConfig(output_dir=tmp_path / "runs", progress=False)
    mse = evaluate(None, ["linear_sae", "mlp?hidden=16"], [base], config)
    cos = evaluate(None, ["linear_sae", "mlp?hidden=16"], [base + "&known_codes_loss=cosine"], config)
    for a, b in zip(mse, cos):
        assert "known_codes_loss" not in a.config["task"]["params"]  # the default: records made before it match
        assert b.config["task"]["params"]["known_codes_loss"] == "cosine"
        assert a.config_hash != b.config_hash
        assert a.metrics["latent_mcc_known_codes"] != b.metrics["latent_mcc_known_codes"]


def test_sparsity_sweep_records_one_row_per_encoder_and_penalty(tmp_path):
    out = tmp_path / "runs"
    task = ("synthetic?seeds=2&steps=60&regimes=unknown&train_samples=64&test_samples=64"
            "&sparsity_sweep=0.001,0.3")
    specs = ["linear_sae", "sparse_coding?steps=20&iters=30", "ito?method=gradient&iters=20"]
    recs = evaluate(None, specs, [task], RunConfig(output_dir=out, progress=False))
    for rec in recs:
        details = [json.loads(line) for line in (out / "synthetic" / rec.details_file).read_text().splitlines()]
        rows = [d for d in details if d.get("curve") == "tradeoff"]
        assert [r["x"] for r in rows] == [0.001, 0.3]
        assert all(r[m] is not None and r[f"{m}_se"] is not None for r in rows for m in ("l0", "l1", "mse", "latent_mcc"))
        assert rows[1]["l1"] < rows[0]["l1"]  # a larger penalty, smaller codes
        assert rec.extra["curves"]["tradeoff"]["plot"] == "table"
    figures = write_figures(out, tmp_path / "figures")
    assert [p.name.split("-")[-1] for p in figures] == ["tradeoff.png"]


@pytest.mark.parametrize("task, pattern", [
    ("synthetic?k_active=20", "K=20 active sources cannot exceed N=16 sources"),
    ("synthetic?n_sources=many", "option n_sources='many' of synthetic must be an integer"),
    ("synthetic?regimes=known", "unknown regime(s) known"),
    ("synthetic?grid=1,2", "grid cell '1,2': write N,M,K"),
    ("synthetic?known_codes_loss=l2", "known_codes_loss='l2'; use mse or cosine"),
    ("synthetic?ito_method=lasso", "ito_method='lasso'; use one of mp, omp, gp, gradient"),
    ("synthetic?sparsity_sweep=0.1,big", "sparsity_sweep value 'big': write penalties as numbers"),
    ("synthetic?sparsity_sweep=-1", "sparsity_sweep value '-1': penalties must be finite and non-negative"),
    ("synthetic?tradeoff_regime=known", "tradeoff_regime='known'; use one of"),
])
def test_bad_synthetic_config_is_one_line_and_exit_2(task, pattern, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--task", task, "--encoder", "linear_sae"], capsys, out)
    assert_clean_failure(code, err, out, pattern)


def test_sae_without_a_model_names_linear_sae(tmp_path, capsys):
    """'sae' means sae-lens's SAEs; on a task without a model the SAE trained on the task's samples has its own name."""
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--task", "synthetic", "--encoder", "sae"], capsys, out)
    assert_clean_failure(code, err, out, "an SAE trained on the task's own samples is 'linear_sae'")


def test_a_model_task_without_a_model_says_so(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--task", "ce_kl", "--encoder", "identity"], capsys, out)
    assert_clean_failure(code, err, out, "task 'ce_kl' runs on a language model: pass --model")


def test_task_options_reach_the_task():
    assert resolve_task("synthetic?n_sources=32&k_active=5").cfg.n_sources == 32
    with pytest.raises(SaebenchError, match="synthetic has no option 'x'"):
        resolve_task("synthetic?x=1")




def test_the_zoo_splices_into_a_model_with_flops_in_the_records(tiny_llama, tiny_sae_dir, tmp_path, monkeypatch):
    sae = f"sae:{tiny_sae_dir}"
    specs = [sae, f"ito:{sae}?method=mp", f"ito:{sae}", f"sparse_coding:{sae}?method=topk",
             f"ito:{sae}?method=gradient&iters=30", f"mlp:{sae}?hidden=16&steps=20&train_tokens=2000"]
    config = RunConfig(output_dir=tmp_path / "runs", limit=512, context_len=32, progress=False)
    recs = evaluate(tiny_llama, specs, ["ce_kl"], config)
    by = {r.encoder["label"]: r for r in recs}
    assert by[f"ito:{sae}"].encoder["params"]["k"] == 4  # the SAE's mean L0 (TopK, k=4)
    for label in specs[1:]:
        rec = by[label]
        assert rec.hookpoint == "layers.1.resid_pre" and rec.extra["flops"]["encode_per_token"] > 0
        assert "gradient" in label or rec.metrics["l0"] <= 4 + 1e-6  # gradient ITO's sparsity is its l1's
    assert by[f"ito:{sae}"].metrics["fve"] >= by[sae].metrics["fve"]  # OMP refits on the same budget
    assert by[specs[4]].metrics["fve"] >= by[sae].metrics["fve"]  # gradient steps from the SAE's own codes
    assert by[specs[4]].extra["flops"]["encode_per_token"] == pytest.approx(2 * 32 * 64 + 4 * 32 * 64 * 30, rel=0.01)
    assert by[specs[-1]].extra["flops"]["training"] > 0
    table = (tmp_path / "lb" / "ce_kl.md")
    write_leaderboards(tmp_path / "runs", tmp_path / "lb")
    assert "encode FLOPs/token" in table.read_text() and "| 4.1e+03 " in table.read_text()  # the SAE: 2 x 32 x 64
    assert (tmp_path / "lb" / "ce_kl-1-tradeoff-ce_loss_recovered-vs-l0.png").stat().st_size > 0
    assert "![ce_kl kl against l0](ce_kl-1-tradeoff-kl-vs-l0.png)" in table.read_text()

    from saebench.encoders.mlp import MLPEncoder

    def refit(*args, **kwargs):
        raise AssertionError("a cached fit was trained again")

    monkeypatch.setattr(MLPEncoder, "fit", refit)
    again = evaluate(tiny_llama, [specs[-1]], ["ce_kl"], RunConfig(output_dir=tmp_path / "runs2", limit=512,
                                                                   context_len=32, progress=False))
    assert again[0].metrics["fve"] == pytest.approx(by[specs[-1]].metrics["fve"])


@pytest.mark.parametrize("spec, pattern", [
    ("ito:identity", "ito needs an encoder with a decoder dictionary; 'identity' has none"),
    ("ito", "ito needs the encoder whose dictionary it searches"),
])
def test_ito_bad_input_on_a_model(spec, pattern, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", spec, "--task", "ce_kl"], capsys, out)
    assert_clean_failure(code, err, out, pattern)


def test_ito_k_larger_than_the_dictionary(tiny_llama_dir, tiny_sae_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"ito:sae:{tiny_sae_dir}?k=100&method=mp",
                         "--task", "ce_kl"], capsys, out)
    assert_clean_failure(code, err, out, "ito option k=100 is larger than")
