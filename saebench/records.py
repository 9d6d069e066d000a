"""Result records: one versioned JSON file per (task, encoder), written atomically.

Every record is checked against the JSON Schema shipped with saebench
(saebench/schema/record-v1.schema.json) when written and when read: a file that does not match
is never reused or ranked, and `saebench leaderboard` names it with the reason.

The config hash covers everything that changes a result (task name, version and parameters,
encoder spec, model identity and dtype, hookpoint, data, seed, splice settings) and nothing
that does not (batch size, output folder). A finished record with the same hash is reused,
so an interrupted multi-encoder run restarts where it stopped.
"""

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1


def _installed_version() -> str:
    try:
        return version("saebench")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"


SAEBENCH_VERSION = _installed_version()
"""The installed saebench's version, stamped into every record (saebench.__version__)."""


@dataclass(frozen=True)
class MetricSpec:
    """A metric a task reports."""

    name: str
    direction: Literal["higher", "lower", "none"] = "none"
    """Which way is better; 'none' for descriptive metrics."""
    description: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """Identity of a task; `version` is bumped whenever a metric's meaning changes."""

    name: str
    version: int
    headline: str
    """Metric leaderboards rank by."""
    metrics: tuple[MetricSpec, ...]
    summary: tuple[str, ...] = ()
    """Metrics shown in printed tables and leaderboards (default: all)."""
    stderr_method: str = "clustered by context"
    """How the standard errors are computed (printed in leaderboard headings)."""
    limit_unit: str = "tokens"
    """What --limit counts for this task ('tokens', 'items' or 'samples'); stated in every record."""
    tradeoffs: tuple[tuple[str, str], ...] = ()
    """(x, y) metric pairs leaderboards plot against each other, one point per encoder, with the Pareto
    frontier (lower x is better: x is a cost such as L0; y's direction is its metric's)."""

    def summary_metrics(self) -> tuple[str, ...]:
        """The metrics tables show: `summary` (default all), the headline always among them, first if added."""
        shown = self.summary or tuple(m.name for m in self.metrics)
        return shown if self.headline in shown else (self.headline, *shown)

    def metric(self, name: str) -> MetricSpec:
        return next(m for m in self.metrics if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        """What a record carries about its task, so leaderboards need no plugin to read it."""
        return {"name": self.name, "version": self.version, "headline": self.headline,
                "summary": list(self.summary_metrics()), "stderr_method": self.stderr_method,
                "limit_unit": self.limit_unit,
                "tradeoffs": [list(pair) for pair in self.tradeoffs],
                "metrics": {m.name: {"direction": m.direction, "description": m.description} for m in self.metrics}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        metrics = tuple(MetricSpec(name, m["direction"], m.get("description", "")) for name, m in data["metrics"].items())
        return cls(data["name"], data["version"], data["headline"], metrics, tuple(data["summary"]),
                   data["stderr_method"], data.get("limit_unit", "tokens"),
                   tuple(tuple(pair) for pair in data.get("tradeoffs", ())))


@dataclass
class RunRecord:
    """One task's result for one encoder."""

    task: dict[str, Any]
    """{'name', 'version'} and, since records carry them, 'headline', 'summary', 'stderr_method' and
    'metrics' ({name: {direction, description}}): leaderboards need no task plugin to read a record."""
    encoder: dict[str, Any]
    """The EncoderSpec as a dict, plus the plugin's distribution and version."""
    model: dict[str, Any] | None
    """{'id', 'revision', 'name', 'dtype'}; None for a task without a language model (synthetic data)."""
    hookpoint: str | None
    """None for a task without a language model."""
    config: dict[str, Any]
    """Everything hashed into config_hash."""
    config_hash: str
    metrics: dict[str, float | None]
    stderr: dict[str, float | None]
    n: dict[str, int | None]
    """Number of tokens (or items) behind each metric."""
    seconds: float
    seed: int
    saebench_version: str
    git_sha: str | None
    created: str | None = None
    """UTC time the record was written (ISO 8601); leaderboards keep the newest of re-runs."""
    details_file: str | None = None
    """JSONL of per-item details next to the record, when the task produces them."""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@cache
def _validator():
    import jsonschema

    text = resources.files("saebench").joinpath(f"schema/record-v{SCHEMA_VERSION}.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_problem(data: Any) -> str | None:
    """Why `data` is not a valid record of this saebench's schema version, or None when it is."""
    if not isinstance(data, dict) or "schema_version" not in data:
        return "not a saebench record (no schema_version)"
    if data["schema_version"] != SCHEMA_VERSION:
        return f"record schema version {data['schema_version']}, this saebench reads version {SCHEMA_VERSION}"
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path) or "the record"
    return f"does not match the record schema at {where}: {error.message}"


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `config` (first 16 hex digits)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """`text` as a file name: runs of other characters than letters, digits, '_', '.' and '-' become '_' (at most
    80 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "encoder"


def record_path(output_dir: Path, task: str, encoder_label: str, chash: str) -> Path:
    """Where the record of (task, encoder, config) lives."""
    return Path(output_dir) / task / f"{slug(encoder_label)}-{chash}.json"


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes, as they are) to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: RunRecord) -> None:
    data = record.to_dict()
    if (problem := schema_problem(data)) is not None:
        raise RuntimeError(f"saebench built an invalid record for {path.name}: {problem}")
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _checked(path: Path) -> tuple[RunRecord | None, str | None]:
    """(the record at `path`, None), or (None, why it is not a usable record)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, f"not readable JSON ({exc})"
    if (problem := schema_problem(data)) is not None:
        return None, problem
    return RunRecord.from_dict(data), None


def read_record(path: Path) -> RunRecord | None:
    """The record at `path`, or None when absent, unreadable or not a valid record."""
    return _checked(path)[0]


def scan_record_files(runs_dir: Path) -> tuple[list[tuple[Path, RunRecord]], list[tuple[Path, str]]]:
    """Every record under `runs_dir` with its path (details files lie next to it), and each rejected file.

    Temporary files of writes in progress (names starting with '.') are not records.
    """
    out, rejected = [], []
    for path in sorted(Path(runs_dir).rglob("*.json")):
        if path.name.startswith("."):
            continue
        rec, problem = _checked(path)
        if rec is None:
            rejected.append((path, problem))
        else:
            out.append((path, rec))
    return out, rejected


def git_sha() -> str | None:
    """Commit of the saebench source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
