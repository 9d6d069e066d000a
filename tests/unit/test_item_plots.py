"""The benchmark tasks' per-item plots (saebench.item_plots), drawn by `saebench leaderboard` from fake records
with torch unimportable, and the presets that follow Anders & Bloom (source 004)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saebench.errors import SaebenchError
from tests.unit.fake_benchmark_records import write_fake_records
from tests.unit.test_output_layer import SCRIPT

ROOT = Path(__file__).resolve().parents[2]


def test_leaderboard_draws_the_per_item_plots_without_torch(tmp_path):
    runs = write_fake_records(tmp_path / "runs", layers=(0, 3, 6), items=120, latents=150)
    out = tmp_path / "lb"
    done = subprocess.run([sys.executable, "-c", SCRIPT, "leaderboard", "--runs", str(runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "heavy modules loaded: []" in done.stdout
    md = (out / "lambada.md").read_text()
    files = sorted(p.name for p in out.glob("lambada-1-items-*.png"))
    assert files == ["lambada-1-items-by-hookpoint.png", "lambada-1-items-features-sae_default.png",
                     *[f"lambada-1-items-scatter-sae_default_layers.{k}.resid_post.png" for k in (0, 3, 6)],
                     "lambada-1-items-strips-sae_default.png"]
    assert all(f"]({name})" in md for name in files) and "**Per item**" in md
    assert all((out / name).stat().st_size > 10_000 for name in files)


def test_records_without_item_classes_draw_no_item_plots(tmp_path):
    from saebench.item_plots import item_sections
    from saebench.records import RunRecord

    runs = write_fake_records(tmp_path / "runs", layers=(0,), items=20, latents=0)
    [path] = (runs / "lambada").glob("*.json")
    rec = RunRecord.from_dict(json.loads(path.read_text()))
    details = path.parent / rec.details_file
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    details.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "outcome"}) + "\n" for r in rows))
    assert item_sections("lambada", 1, [(rec, path)], tmp_path / "lb") == ""  # a version-1 record's rows
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("name, task, params", [
    ("lambada_anders_bloom", "LambadaTask", {"items": 1000}),
    ("cbt_cn_anders_bloom", "CBTTask", {"subset": "cn", "items": 1000}),
])
def test_benchmark_presets_resolve_with_their_protocol(name, task, params):
    from saebench.tasks.names import resolve_task

    resolved = resolve_task(name)
    assert type(resolved).__name__ == task
    assert {k: getattr(resolved, k) for k in params} == params


def test_sweep_presets_resolve_with_their_protocol():
    from saebench.tasks.context_sweep import ContextSweepConfig, bucket_spans
    from saebench.tasks.error_propagation import ErrorPropagationConfig
    from saebench.tasks.names import resolve_task, task_names

    assert resolve_task("context_sweep_anders_bloom").defaults == ContextSweepConfig(1024, 98, "single")
    # 004: "colored by position at indices [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1022]"
    assert [lo for lo, hi in bucket_spans(1024, "single") if lo == hi] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1022]
    assert len(bucket_spans(1024, "single")) == 11 and bucket_spans(100, "log2")[-1] == (64, 99)
    # 004 averages "over the first 100 (non-BOS) tokens": positions 1..max_len-1 with BOS at 0
    assert resolve_task("error_propagation_anders_bloom").defaults == ErrorPropagationConfig(101, 128)
    for name in ("lambada_anders_bloom", "cbt_cn_anders_bloom", "context_sweep_anders_bloom",
                 "error_propagation_anders_bloom"):
        assert "Anders & Bloom (004)" in task_names()[name]
    with pytest.raises(SaebenchError, match="context_sweep parameter buckets='linear': choose log2 or single"):
        resolve_task("context_sweep?buckets=linear")


def test_context_sweep_single_positions_on_a_tiny_model(tiny_llama, tmp_path):
    from saebench import RunConfig, evaluate

    [rec] = evaluate(tiny_llama, ["zero"], ["context_sweep?buckets=single"],
                     RunConfig(limit=2, output_dir=tmp_path, progress=False, task_params={"max_len": 40}))
    rows = [json.loads(line) for line in next(tmp_path.rglob(rec.details_file)).read_text().splitlines()]
    assert [r["x"] for r in rows if r["curve"] == "bucket"] == ["1", "2", "4", "8", "16", "32", "38"]
    position = {r["x"]: r for r in rows if r["curve"] == "position"}
    for r in rows:
        if r["curve"] == "bucket":  # a single-position bucket is that position's mean
            assert r["dce"] == pytest.approx(position[r["first"]]["dce"])
    assert rec.config["task"]["params"]["buckets"] == "single"
