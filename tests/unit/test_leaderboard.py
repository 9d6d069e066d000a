import csv
import re

import pytest

from saebench import RunConfig, evaluate
from saebench.cli import main


def test_leaderboard_ranks_by_headline_and_writes_csv(tiny_llama, tmp_path, capsys):
    recs = evaluate(tiny_llama, ["zero", "identity", "mean"], ["ce_kl"],
             RunConfig(limit=128, context_len=16, output_dir=tmp_path / "runs", progress=False))
    assert main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "ce_kl.md").read_text()
    assert "## ce_kl v2 · tiny-llama (float32)\n" in md
    cells = [line.split("|") for line in md.splitlines() if line.startswith("|")]
    links = [c[2].strip() for c in cells if c[1].strip().isdigit()]
    order = [re.fullmatch(r"\[(.+)\]\((records/ce_kl/.+\.json)\)", link).group(1) for link in links]
    for link in links:  # each encoder links to its record, copied next to the leaderboard
        assert (tmp_path / "lb" / re.fullmatch(r"\[.+\]\((.+)\)", link).group(1)).exists()
    assert {c[3].strip() for c in cells if c[1].strip().isdigit()} == {"layers.1.resid_pre"}
    by_value = sorted(recs, key=lambda r: -r.metrics["ce_loss_recovered"])
    assert order == [r.encoder["label"] for r in by_value] and order[0] == "identity"
    rows = list(csv.DictReader((tmp_path / "lb" / "ce_kl.csv").open()))
    assert [r["encoder"] for r in rows] == order and float(rows[0]["ce_loss_recovered"]) == pytest.approx(1.0)


def test_leaderboard_without_records_is_a_clean_error(tmp_path, capsys):
    assert main(["leaderboard", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "lb")]) == 2
    assert "no records under" in capsys.readouterr().err


def test_leaderboards_never_mix_task_versions(tiny_llama, tmp_path):
    import json

    evaluate(tiny_llama, ["identity"], ["ce_kl"],
             RunConfig(limit=64, context_len=16, output_dir=tmp_path / "runs", progress=False))
    path = next((tmp_path / "runs").rglob("*.json"))
    data = json.loads(path.read_text())
    data["task"]["version"] = 99
    (path.parent / "older.json").write_text(json.dumps(data))
    main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")])
    md = (tmp_path / "lb" / "ce_kl.md").read_text()
    assert "ce_kl v2 ·" in md and "ce_kl v99 ·" in md


def test_leaderboards_never_mix_dtypes(tiny_llama, tmp_path):
    import json

    evaluate(tiny_llama, ["identity"], ["ce_kl"],
             RunConfig(limit=64, context_len=16, output_dir=tmp_path / "runs", progress=False))
    path = next((tmp_path / "runs").rglob("*.json"))
    data = json.loads(path.read_text())
    data["model"]["dtype"] = "bfloat16"
    (path.parent / "bf16.json").write_text(json.dumps(data))
    main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")])
    md = (tmp_path / "lb" / "ce_kl.md").read_text()
    assert "tiny-llama (float32)\n" in md and "tiny-llama (bfloat16)\n" in md


def _one_record(tiny_llama, runs, **kw):
    import json

    evaluate(tiny_llama, ["identity"], ["ce_kl"],
             RunConfig(limit=64, context_len=16, output_dir=runs, progress=False, **kw))
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("*.json"))]


def test_runs_that_differ_in_settings_get_separate_labelled_tables(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    _one_record(tiny_llama, runs)
    _one_record(tiny_llama, runs, seed=1)
    evaluate(tiny_llama, ["identity"], ["ce_kl"],
             RunConfig(limit=128, context_len=16, output_dir=runs, progress=False))
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "ce_kl.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("Settings:")]
    assert len(headings) == 3, md
    assert any("tokens=64" in h and "seed=0" in h for h in headings)
    assert any("tokens=64" in h and "seed=1" in h for h in headings)
    assert any("tokens=128" in h and "seed=0" in h for h in headings)
    assert all("Standard errors: clustered by context" in h for h in headings)


def test_reruns_keep_the_newest_and_say_how_many_were_superseded(tiny_llama, tmp_path):
    import json

    runs = tmp_path / "runs"
    [data] = _one_record(tiny_llama, runs)
    older = dict(data, created="2000-01-01T00:00:00+00:00", metrics=dict(data["metrics"], kl=123.0))
    (runs / "ce_kl" / "older.json").write_text(json.dumps(older))
    main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb")])
    md = (tmp_path / "lb" / "ce_kl.md").read_text()
    assert "1 older record(s) of the same encoders and settings superseded" in md and "123" not in md


def test_records_stand_alone_without_their_task_plugin(tiny_llama, tmp_path):
    import json

    runs = tmp_path / "runs"
    [data] = _one_record(tiny_llama, runs)
    data["task"]["name"] = "someone_elses_task"  # no such plugin is installed
    (runs / "ce_kl" / "foreign.json").write_text(json.dumps(data))
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "someone_elses_task.md").read_text()
    assert "Ranked by `ce_loss_recovered` (higher is better)" in md and "| [identity](records/someone_elses_task/foreign.json)" in md


def test_pareto_front_keeps_the_points_nothing_beats():
    from saebench.plots import pareto_front

    points = [(32, 0.95), (16, 0.90), (64, 0.97), (32, 0.93), (64, 0.96), (8, 0.80)]
    assert pareto_front(points, higher_is_better=True) == [5, 1, 0, 2]
    kl = [(32, 0.4), (16, 0.6), (64, 0.5)]
    assert pareto_front(kl, higher_is_better=False) == [1, 0]


def test_ranks_stay_within_a_hookpoint(tiny_llama, tmp_path):
    """Encoders at two hookpoints share a table, ordered by hookpoint, each ranked among its own hookpoint's."""
    evaluate(tiny_llama, ["zero@layers.1.resid_pre", "identity@layers.1.resid_pre", "zero@layers.0.resid_post",
                          "identity@layers.0.resid_post"], ["ce_kl"],
             RunConfig(limit=128, context_len=16, output_dir=tmp_path / "runs", progress=False))
    assert main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    cells = [[c.strip() for c in line.split("|")[1:4]] for line in (tmp_path / "lb" / "ce_kl.md").read_text().splitlines()
             if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert [(rank, hp) for rank, _, hp in cells] == [("1", "layers.0.resid_post"), ("2", "layers.0.resid_post"),
                                                     ("1", "layers.1.resid_pre"), ("2", "layers.1.resid_pre")]
    assert [re.match(r"\[(\w+)", enc).group(1) for _, enc, _ in cells] == ["identity", "zero", "identity", "zero"]
