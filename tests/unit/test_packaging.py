"""Presets ship inside the wheel, so a non-editable install finds them."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_presets_and_entry_points(tmp_path):
    pytest.importorskip("hatchling")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("saebench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "saebench/_presets/tasks/ce_kl.yaml" in names
    assert "saebench/_presets/registry/models.yaml" in names
    assert "saebench/schema/record-v1.schema.json" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[saebench.encoders]" in entry_points and "ce_kl = saebench.tasks.ce_kl:CEKLTask" in entry_points


def test_presets_load_from_the_source_tree():
    from saebench.models import model_presets
    from saebench.presets import preset_dir

    assert {"smollm2-135m", "gpt2-small", "pythia-70m-deduped", "gemma-2-2b"} <= set(model_presets())
    assert (preset_dir("tasks") / "ce_kl.yaml").exists()


def test_no_module_over_400_lines():
    """Small modules (docs/architecture.md): a module that outgrows 400 lines is split by what it holds."""
    sizes = {str(p.relative_to(ROOT)): p.read_text().count("\n") for p in (ROOT / "saebench").rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > 400} == {}
