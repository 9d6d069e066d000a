"""YAML presets from the top-level tasks/ and registry/ folders.

They ship inside the wheel as saebench/_presets/ (see pyproject.toml); in a source checkout
or an editable install they are read from the repository root.
"""

from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml


def preset_dir(kind: str) -> Path:
    """Folder holding the presets of `kind` ('tasks' or 'registry')."""
    installed = Path(str(files("saebench"))) / "_presets" / kind
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / kind


@cache
def load_presets(kind: str, name: str) -> dict[str, Any]:
    """Parse `<kind>/<name>.yaml`, or every YAML file of `kind` merged when name is '*'."""
    folder = preset_dir(kind)
    paths = sorted(folder.glob("*.yaml")) if name == "*" else [folder / f"{name}.yaml"]
    merged: dict[str, Any] = {}
    for path in paths:
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged
