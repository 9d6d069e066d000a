"""lm-eval tasks as saebench reads them: a task by name or YAML path, with a local JSON/JSONL data file checked
line by line before lm-eval sees it (a missing field is one error naming the line, not a template traceback)."""

import functools
import hashlib
import json
from pathlib import Path

from saebench.errors import SaebenchError, did_you_mean


def file_sha256(path: str | None) -> str | None:
    """Hex sha256 of a data file (None for None); a missing file is a user error."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SaebenchError(f"--data-file {path!r} does not exist")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_json_data_file(path: str | None, fields: tuple[str, ...] = ()) -> None:
    """A JSON or JSON-lines --data-file parses, holds rows, and each JSON-lines row has `fields`; or one clear
    error naming the bad line (lm-eval would fail later with a traceback: StopIteration, jinja2 UndefinedError)."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise SaebenchError(f"--data-file {path!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SaebenchError(f"--data-file {path!r} is not valid JSON ({exc})") from exc
        if not data:
            raise SaebenchError(f"--data-file {path!r} holds no rows")
        return
    rows = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SaebenchError(f"--data-file {path!r} line {number} is not valid JSON ({exc}); "
                                "a JSON-lines file holds one JSON object per line") from exc
        if not isinstance(row, dict):
            raise SaebenchError(f"--data-file {path!r} line {number} is not a JSON object")
        if missing := [f for f in fields if f not in row]:
            raise SaebenchError(f"--data-file {path!r} line {number} has no {missing[0]!r} field (it has "
                                f"{', '.join(map(repr, row)) or 'none'}); every line needs "
                                f"{', '.join(map(repr, fields))}")
        rows += 1
    if not rows:
        raise SaebenchError(f"--data-file {path!r} is empty; a JSON-lines file holds one JSON object per line")


@functools.lru_cache(maxsize=1)
def _builtin_task_manager():
    """lm-eval's index of the tasks it ships. Building it reads every task YAML lm-eval has (8 s of a 9 s lambada
    run on the tests' tiny model, 2-core CPU), and those files do not change while the process runs, so it is built
    once per process. An --include-path folder is indexed afresh on each load: its YAMLs are the user's to edit."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_lm_eval_task(name: str, include_path: str | None, data_file: str | None):
    """Build one lm-eval task by name or YAML path; `data_file` replaces its evaluation split."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager(include_path=include_path) if include_path else _builtin_task_manager()
    entry = manager.task_index.get(name)
    if entry is None and not Path(name).is_file():
        raise SaebenchError(f"unknown lm-eval task {name!r}{did_you_mean(name, manager.all_tasks)}; "
                            "`lm_eval ls tasks` lists them")
    spec: str | dict = name
    if data_file is not None:
        cfg = dict(entry.cfg) if entry is not None and entry.cfg else load_yaml(
            entry.yaml_path if entry is not None else Path(name), resolve_func=True)
        split = cfg.get("test_split") or cfg.get("validation_split") or "test"
        spec = cfg | {"dataset_path": "json", "dataset_name": None,
                      "dataset_kwargs": {"data_files": {split: str(Path(data_file).resolve())}},
                      "test_split": split if cfg.get("test_split") else None,
                      "validation_split": split if not cfg.get("test_split") else None}
    from jinja2.exceptions import UndefinedError

    try:
        tasks = manager.load(spec)["tasks"]
    except UndefinedError as exc:  # a document lacks a field the task's prompt template reads
        raise SaebenchError(f"lm-eval task {name!r}: a document lacks a field its prompt template uses ({exc}); "
                            "check --data-file's fields") from exc
    except (OSError, ConnectionError, ValueError) as exc:
        raise SaebenchError(f"could not load lm-eval task {name!r} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); offline, pass --data-file") from exc
    if len(tasks) != 1:
        raise SaebenchError(f"lm-eval {name!r} is a group of {len(tasks)} tasks; pass one task at a time")
    return next(iter(tasks.values()))
