"""`saebench sweep`: the grid in process and on Ray (same numbers), resuming after a killed worker, shards, bad input."""

import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml

from saebench import sweep
from saebench.cli import main
from saebench.records import scan_record_files
from tests.unit.test_cli_errors import assert_clean_failure

# 2 seeds x 2 encoder entries x ce_kl: 4 jobs, 6 records (identity and zero share a job)
SETTINGS = {"limit": 256, "context_len": 32, "batch_size": 4, "hookpoint": "layers.1.resid_pre"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama saved as a local model folder, shared by the module's sweeps."""
    from tests.conftest import make_tiny

    path = tmp_path_factory.mktemp("sweep-model") / "tiny-llama"
    loaded = make_tiny("llama", tiny_tokenizer)
    loaded.model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray on 2 CPUs for the module's Ray sweeps (`saebench sweep --ray` uses a Ray already started)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def write_sweep(folder, model_dir, **changes):
    data = {"models": [str(model_dir)], "encoders": [["identity", "zero"], "mean"], "tasks": ["ce_kl"],
            "seeds": [0, 1], "settings": SETTINGS} | changes
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(argv, capsys):
    """Exit code, the summary (stdout's last line: Ray's driver prints its workers' messages before it), stderr."""
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, (out.strip().splitlines() or [""])[-1], err.strip()


def metrics_by_record(out):
    found, bad = scan_record_files(out)
    assert not bad
    return {(r.task["name"], r.encoder["label"], r.seed): r.metrics for _, r in found}


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}


@pytest.fixture(scope="module")
def local_sweep(tiny_model_dir, tmp_path_factory):
    """The sweep file and the records of its in-process run, with that run's summary and record mtimes."""
    folder = tmp_path_factory.mktemp("sweep")
    path, out = write_sweep(folder, tiny_model_dir), folder / "runs"
    summary = sweep.run_sweep(sweep.load_sweep(path), out, quiet=True)
    return path, out, summary.line(), mtimes(out)


def test_sweep_in_process_writes_records_and_a_rerun_reuses_them(local_sweep, capsys):
    path, out, summary, written = local_sweep
    assert summary.startswith("4 jobs: 4 computed, 0 reused, 0 failed; 6 records written, 0 reused"), summary
    assert len(written) == 6 and {k[1:] for k in metrics_by_record(out)} == {
        (label, seed) for label in ("identity", "zero", "mean") for seed in (0, 1)}
    assert all(abs(m["ce_loss_recovered"] - 1) < 1e-6 for k, m in metrics_by_record(out).items() if k[1] == "identity")

    code, summary, _ = run_cli(["sweep", str(path), "--output", str(out)], capsys)
    assert code == 0
    assert summary.startswith("4 jobs: 0 computed, 4 reused, 0 failed; 0 records written, 6 reused"), summary
    assert mtimes(out) == written  # nothing computed again


def test_a_failed_job_is_reported_and_the_others_go_on(tiny_model_dir, tmp_path, capsys):
    path = write_sweep(tmp_path, tiny_model_dir, encoders=["sae:/no/such/sae_dir", "identity"], seeds=[0])
    code, summary, err = run_cli(["sweep", str(path), "--output", str(tmp_path / "runs")], capsys)
    assert code == 1
    assert summary.startswith("2 jobs: 1 computed, 0 reused, 1 failed; 1 records written"), summary
    (line,) = err.splitlines()
    assert line.startswith(f"saebench: job failed (model={tiny_model_dir} encoders=sae:/no/such/sae_dir "
                           "task=ce_kl seed=0): SAE path '/no/such/sae_dir' does not exist"), line


def test_ray_sweep_gives_the_same_numbers_as_the_in_process_one(ray_session, local_sweep, tmp_path, capsys):
    path, local, *_ = local_sweep
    code, summary, _ = run_cli(["sweep", str(path), "--output", str(tmp_path / "ray"), "--ray"], capsys)
    assert code == 0 and summary.startswith("4 jobs: 4 computed"), summary
    assert ray_session.is_initialized()  # a Ray the sweep did not start is left running
    expected = metrics_by_record(local)
    assert len(expected) == 6 and metrics_by_record(tmp_path / "ray") == expected


def test_a_killed_worker_fails_its_job_and_the_rerun_computes_only_what_is_missing(
        ray_session, tiny_model_dir, tmp_path, monkeypatch, capsys):
    path, out, marker = write_sweep(tmp_path, tiny_model_dir), tmp_path / "runs", tmp_path / "killed-once"
    original = sweep.run_job

    def die_once(job, *args, **kwargs):  # pickled by value into the Ray worker that runs it
        if job.encoders == ("mean",) and job.seed == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(job, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_job", die_once)
    code, summary, err = run_cli(["sweep", str(path), "--output", str(out), "--ray"], capsys)
    assert marker.exists() and code == 1
    assert summary.startswith("4 jobs: 3 computed, 0 reused, 1 failed; 5 records written"), summary
    assert f"saebench: job failed (model={tiny_model_dir} encoders=mean task=ce_kl seed=1): " in err
    first = mtimes(out)
    assert len(first) == 5

    code, summary, _ = run_cli(["sweep", str(path), "--output", str(out), "--ray"], capsys)
    assert code == 0
    assert summary.startswith("4 jobs: 1 computed, 3 reused, 0 failed; 1 records written, 5 reused"), summary
    second = mtimes(out)
    assert {p: second[p] for p in first} == first  # the finished records were not written again
    assert [p.name.split("-")[0] for p in set(second) - set(first)] == ["mean"]


def test_shards_partition_the_jobs(tiny_model_dir, tmp_path, capsys):
    grid = sweep.parse_sweep({"models": ["a", "b"], "encoders": [["identity", "zero"], "mean", "sae:default"],
                              "tasks": ["ce_kl", "synthetic"], "seeds": [0, 1, 2]})
    jobs = sweep.expand_jobs(grid)
    assert len(jobs) == len(set(jobs)) == 2 * 3 * 3 + 3 * 3  # synthetic jobs have no model: once, not per model
    shards = [sweep.shard_jobs(jobs, f"{i}/4") for i in range(4)]
    assert sorted(map(str, sum(shards, []))) == sorted(map(str, jobs))  # union = all, and no job twice
    assert sweep.shard_jobs(jobs, "0/1") == jobs

    path = write_sweep(tmp_path, tiny_model_dir)
    by_shard = []
    for i in range(3):  # 4 jobs over 3 shards: jobs 0 and 3, job 1, job 2
        out = tmp_path / f"shard{i}"
        assert run_cli(["sweep", str(path), "--output", str(out), "--shard", f"{i}/3"], capsys)[0] == 0
        by_shard.append(set(metrics_by_record(out)))
    assert [len(s) for s in by_shard] == [3, 1, 2]
    assert set.union(*by_shard) == {("ce_kl", label, seed) for label in ("identity", "zero", "mean") for seed in (0, 1)}


@pytest.mark.parametrize("change, argv, pattern", [
    ({"model": ["x"]}, [], "unknown key in {path}: 'model' (did you mean 'models'?)"),
    ({"settings": {"limt": 10}}, [], "unknown setting in {path}: 'limt' (did you mean 'limit'?)"),
    ({"settings": {"seed": 1}}, [], "'seed' is no setting of a sweep: give 'seeds: [...]'"),
    ({"settings": {"limit": "many"}}, [], "setting 'limit' must be an integer or null, not 'many'"),
    ({"settings": {"limit": 0}}, [], "--limit must be a positive number"),
    ({"resources": {"gpus": 1}}, [], "did you mean 'num_gpus'?"),
    ({"encoders": ["identiy"]}, [], "unknown encoder 'identiy' (did you mean 'identity'?)"),
    ({"tasks": ["ce_k"]}, [], "unknown task 'ce_k' (did you mean 'ce_kl'?)"),
    ({"models": ["smollm2-13m"]}, [], "unknown model 'smollm2-13m' (did you mean 'smollm2-135m'?)"),
    ({"models": []}, [], "task 'ce_kl' runs on a language model: give 'models: [...]'"),
    ({"seeds": ["a"]}, [], "seeds in {path} must be a list of integers"),
    ({}, ["--shard", "3/3"], "--shard must be I/N with 0 <= I < N"),
    ({}, ["--shard", "x"], "--shard must be I/N with 0 <= I < N"),
])
def test_bad_sweeps_fail_with_one_line_before_any_job(change, argv, pattern, tmp_path, capsys):
    path, out = write_sweep(tmp_path, "/no/model/needed", **change), tmp_path / "runs"
    code, _, err = run_cli(["sweep", str(path), "--output", str(out), *argv], capsys)
    assert_clean_failure(code, err, out, pattern.format(path=path))
    assert not out.exists()


@pytest.mark.parametrize("text, pattern", [
    (None, "cannot read sweep file"),
    ("models: [a\n", "is not valid YAML at line 2"),
    ("- a\n- b\n", "must be a mapping with keys models, encoders"),
])
def test_unreadable_sweep_files(text, pattern, tmp_path, capsys):
    path, out = tmp_path / "sweep.yaml", tmp_path / "runs"
    if text is not None:
        path.write_text(text)
    code, _, err = run_cli(["sweep", str(path), "--output", str(out)], capsys)
    assert_clean_failure(code, err, out, pattern)
    assert not out.exists()


def test_ray_flag_without_ray_says_how_to_install_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    path, out = write_sweep(tmp_path, tiny_model_dir), tmp_path / "runs"
    code, _, err = run_cli(["sweep", str(path), "--output", str(out), "--ray"], capsys)
    assert_clean_failure(code, err, out, "pip install 'saebench[ray]'")
    assert not out.exists()


def test_the_sweep_file_of_the_docs_is_valid(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "sweeps.md").read_text()
    (block,) = re.findall(r"^```yaml\n(.*?)^```$", text, re.S | re.M)
    grid = sweep.parse_sweep(yaml.safe_load(block))
    sweep.check_sweep(grid, tmp_path / "runs")
    assert len(sweep.expand_jobs(grid)) == 1 * 2 * 3 * 1  # models x seeds x encoder entries x tasks
