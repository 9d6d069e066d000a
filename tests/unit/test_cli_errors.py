"""Bad input: one line on stderr, exit code 2, no traceback, no result file."""

import json
import subprocess
import sys

import pytest
import torch

from saebench.cli import main


def run_cli(argv, capsys, out):
    code = main([*argv, "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out, pattern):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert pattern in err, err
    assert not out.exists() or not list(out.rglob("*.json"))


@pytest.mark.parametrize("argv, pattern", [
    (["--encoder", "identiy", "--task", "ce_kl"], "did you mean 'identity'"),
    (["--encoder", "identity", "--task", "ce_k"], "did you mean 'ce_kl'"),
    (["--encoder", "identity", "--task", "ce_kl", "--limit", "0"], "--limit must be a positive number"),
    (["--encoder", "sae:/no/such/sae_dir", "--task", "ce_kl"], "SAE path '/no/such/sae_dir' does not exist"),
    (["--encoder", "identity", "--task", "ce_kl", "--hookpoint", "layers.9.resid_post"],
     "valid hookpoints are layers.0.resid_pre .. layers.1.resid_pre"),
])
def test_bad_input_on_a_local_model(argv, pattern, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), *argv], capsys, out)
    assert_clean_failure(code, err, out, pattern)


def test_unknown_model_gets_did_you_mean(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", "smollm2-13m", "--encoder", "identity", "--task", "ce_kl"], capsys, out)
    assert_clean_failure(code, err, out, "did you mean 'smollm2-135m'")


def test_sae_with_wrong_width(tiny_llama_dir, tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae_dir = tmp_path / "sae16"
    StandardSAE(StandardSAEConfig(d_in=16, d_sae=64)).save_model(sae_dir)
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"sae:{sae_dir}", "--task", "ce_kl",
                         "--hookpoint", "layers.1.resid_pre"], capsys, out)
    assert_clean_failure(code, err, out, "has d_in 16 but model")


def test_nan_in_activations(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(tiny_llama_dir)
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", "identity", "--task", "ce_kl",
                         "--hookpoint", "layers.1.resid_pre", "--limit", "64", "--context-len", "16"], capsys, out)
    assert_clean_failure(code, err, out, "NaN or inf in the model's activations at layers.1.resid_pre")


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saebench.cli", "run", "--model", "nonexistent-model",
                           "--encoder", "identity", "--task", "ce_kl", "--output", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("saebench: error: unknown model 'nonexistent-model'")
    assert "Traceback" not in proc.stderr


def test_help_for_every_subcommand(capsys):
    for argv in (["--help"], ["run", "--help"], ["list", "--help"], ["leaderboard", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "usage: saebench" in capsys.readouterr().out


def test_malformed_jsonl_data_file(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "lambada.jsonl"
    bad.write_text('{"text": "one two three"}\n{"text": "four five\n')
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", "identity", "--task", "lambada",
                         "--data-file", str(bad)], capsys, out)
    assert_clean_failure(code, err, out, "line 2 is not valid JSON")


def test_unwritable_output_folder(tiny_llama_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", "identity", "--task", "ce_kl"],
                        capsys, blocker / "runs")
    assert code == 2 and len(err.splitlines()) == 1 and "cannot write records to --output" in err, err


def test_context_longer_than_the_model_supports(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", "identity", "--task", "ce_kl",
                         "--context-len", "100000"], capsys, out)
    assert_clean_failure(code, err, out, "--context-len 100000 is longer than model")


def test_corrupt_record_is_named_by_the_leaderboard(tiny_llama, tmp_path, capsys):
    from saebench import RunConfig, evaluate

    runs = tmp_path / "runs"
    evaluate(tiny_llama, ["identity"], ["ce_kl"], RunConfig(limit=64, context_len=16, output_dir=runs,
                                                            progress=False))
    (runs / "ce_kl" / "broken.json").write_text('{"schema_version": 1, "task": ')
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb")]) == 0
    assert "skipped" in capsys.readouterr().err and (tmp_path / "lb" / "ce_kl.md").exists()
    for good in (runs / "ce_kl").glob("identity-*.json"):
        good.unlink()
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb2")]) == 2
    err = capsys.readouterr().err
    assert "broken.json: not readable JSON" in err and "1 unusable files skipped" in err


def test_records_are_checked_against_the_json_schema(tiny_llama, tmp_path, capsys):
    """A record that parses but breaks the schema is named with the reason, and is never reused."""
    import json

    from saebench import RunConfig, evaluate
    from saebench.records import read_record, schema_problem

    runs = tmp_path / "runs"
    config = RunConfig(limit=64, context_len=16, output_dir=runs, progress=False)
    rec = evaluate(tiny_llama, ["identity"], ["ce_kl"], config)[0]
    assert schema_problem(rec.to_dict()) is None
    path = next((runs / "ce_kl").glob("identity-*.json"))
    data = json.loads(path.read_text())
    data["metrics"]["kl"] = "low"
    path.write_text(json.dumps(data))
    assert read_record(path) is None
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err
    assert "does not match the record schema at metrics.kl: 'low' is not of type 'number', 'null'" in err
    again = evaluate(tiny_llama, ["identity"], ["ce_kl"], config)[0]  # recomputed, not reused
    assert again.metrics["kl"] == rec.metrics["kl"] and read_record(path) is not None


def _sae_at(folder, hook_name):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name=hook_name))).save_model(folder)
    return folder


def test_an_mlp_out_sae_is_spliced_at_mlp_out_and_refused_at_a_residual_hookpoint(tiny_llama_dir, tmp_path, capsys):
    sae_dir = _sae_at(tmp_path / "mlp_out_sae", "blocks.1.hook_mlp_out")
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"sae:{sae_dir}", "--task", "ce_kl",
                         "--hookpoint", "layers.1.resid_pre"], capsys, out)
    assert_clean_failure(code, err, out, "trained at blocks.1.hook_mlp_out (mlp_out) but --hookpoint is "
                                         "layers.1.resid_pre (resid_pre)")
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"sae:{sae_dir}", "--task", "ce_kl",
                         "--limit", "512", "--context-len", "32"], capsys, out)
    assert code == 0, err
    rec = json.loads(next(out.rglob("*.json")).read_text())
    assert rec["hookpoint"] == "layers.1.mlp_out" and rec["metrics"]["ce_loss_recovered"] is not None


def test_an_sae_at_a_hook_saebench_cannot_splice_is_refused(tiny_llama_dir, tmp_path, capsys):
    sae_dir = _sae_at(tmp_path / "mlp_in_sae", "blocks.1.hook_mlp_in")
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", f"sae:{sae_dir}", "--task", "ce_kl"],
                        capsys, out)
    assert_clean_failure(code, err, out, "was trained at 'blocks.1.hook_mlp_in', which saebench cannot splice")


def test_data_file_goes_only_to_the_tasks_that_take_it(tiny_llama_dir, tmp_path, capsys):
    from saebench.tasks.names import params_for

    params = {"data_file": "x.jsonl"}
    assert params_for("ce_kl", params, ["ce_kl", "lambada"]) == {}
    assert params_for("lambada", params, ["ce_kl", "lambada"]) == params
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--encoder", "identity", "--task", "ce_kl",
                         "--data-file", "x.jsonl"], capsys, out)
    assert_clean_failure(code, err, out, "--data-file applies to none of the tasks given (ce_kl)")
