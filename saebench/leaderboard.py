"""Leaderboards: records -> pandas -> tabulate markdown (+ CSV), one table per comparable group.

Records are comparable only when everything that changes their numbers matches: task name and
version, model id, revision and dtype, the task's effective parameters (subset, data file and its
checksum, limit, context length, ...), corpus, seed and splice_bos. Each such group is one table
whose heading lists those settings and how its standard errors were computed; task versions and
dtypes are never mixed, and a random-weight model (model id `random-weights:...`) has tables of its
own whose heading says so. Encoders at different hookpoints of the same model share a table (a
`hookpoint` column tells them apart), so a sweep over layers reads as one table; rows are ordered
by hookpoint, and ranks and trade-off frontiers stay within one hookpoint (frontiers also within one
value of the columns an encoder family displays, e.g. one per SAE architecture). Within a table,
re-runs of the same encoder at the same hookpoint keep the newest record and the heading says
how many were superseded. Rows are ranked by the task's headline
metric in its better direction; `n` is the headline metric's n.
"""

import json
import re
import shutil
import sys
from pathlib import Path

from tabulate import tabulate

from saebench.errors import SaebenchError
from saebench.records import RunRecord, TaskSpec, scan_record_files, write_atomic
from saebench.report import DISPLAY_PREFIX, fmt, hookpoint_order, records_frame


def task_spec_of(rec: RunRecord) -> TaskSpec:
    """The task's spec as the record carries it: leaderboards read records only, never a task plugin."""
    return TaskSpec.from_dict(rec.task)


def comparable_settings(rec: RunRecord) -> dict:
    """Everything besides the encoder that must match for two records to share a table."""
    cfg = rec.config
    params = cfg.get("task", {}).get("params", {})
    if rec.model is None:
        return {"model": None, **params, "seed": cfg.get("seed")}
    return {"model": rec.model["id"], "revision": rec.model.get("revision"), "dtype": rec.model.get("dtype"),
            **params, "corpus": cfg.get("corpus"), "seed": cfg.get("seed"),
            "splice_bos": cfg.get("splice_bos")}


RANDOM_WEIGHTS_PREFIX = "random-weights:"
"""How the model id of a random-weight preset starts (models.RANDOM_WEIGHTS_PREFIX; the output layer may not
import models). Such records are grouped by model id like any other, so they never share a trained model's
table, and their table's heading says the weights are random."""


def is_random_weights(model_id: str | None) -> bool:
    """Whether a record's model id names a random-weight preset (`saebench list models`: random-*)."""
    return bool(model_id) and model_id.startswith(RANDOM_WEIGHTS_PREFIX)


def _group_key(rec: RunRecord) -> tuple:
    return (rec.task["name"], rec.task["version"], json.dumps(comparable_settings(rec), sort_keys=True, default=str))


def _newest(recs: list[RunRecord]) -> tuple[list[RunRecord], int]:
    """One record per (encoder label, hookpoint): the newest (records without a time count as oldest);
    and how many older ones it superseded."""
    best: dict[tuple[str, str], RunRecord] = {}
    for rec in recs:
        key = (rec.encoder["label"], rec.hookpoint)
        old = best.get(key)
        if old is None or (rec.created or "") >= (old.created or ""):
            best[key] = rec
    return list(best.values()), len(recs) - len(best)


COLUMN_TITLES = {"flops_per_token": "encode FLOPs/token", "failed_answers": "failed answers"}


def _text(value) -> str:
    """A frame cell as text: '' for a missing value (None or pandas' NaN)."""
    return value if isinstance(value, str) else ""


def _linked(label: str, link: str | None) -> str:
    return f"[{label}]({link})" if link else label


def _cell(column: str, value) -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    return f"{value:.3g}" if column == "flops_per_token" else str(value)


def _setting_text(key: str, value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        value = value[:12]  # a sha256
    return f"{key}={value}"


def _heading(name: str, version: int, settings: dict, spec: TaskSpec, superseded: int) -> str:
    shown = {k: v for k, v in settings.items() if k not in ("model", "revision", "dtype") and v is not None}
    revision = f", revision {settings['revision']}" if settings.get("revision") else ""
    model = (f"{settings['model']} ({settings['dtype']}{revision})" if settings["model"] is not None
             else "no language model")
    if is_random_weights(settings["model"]):
        model += " · random weights, not a trained model"
    lines = [f"## {name} v{version} · {model}",
             "", f"Settings: {', '.join(_setting_text(k, v) for k, v in shown.items())}. "
                 f"Standard errors: {spec.stderr_method}."]
    if superseded:
        lines[-1] += f" {superseded} older record(s) of the same encoders and settings superseded by newer ones."
    return "\n".join(lines)


def leaderboard_markdown(task: str, recs: list[RunRecord], paths: dict[int, Path] | None = None,
                         out_dir: Path | None = None, links: dict[int, str] | None = None) -> tuple[str, str]:
    """Markdown and CSV text for one task's records (all comparable groups).

    Args:
        paths: each record's file by id(record), so curves in its details file can be drawn.
        out_dir: where curve plots are written (no plots when None).
        links: each record's JSON by id(record), relative to the markdown: encoders link to them.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in recs:
        groups.setdefault(_group_key(rec), []).append(rec)
    newest_spec = task_spec_of(max(recs, key=lambda r: (r.task["version"], r.created or "")))
    headline = newest_spec.metric(newest_spec.headline)
    parts = [f"# {task} leaderboard\n\nRanked by `{newest_spec.headline}` ({headline.direction} is better). "
             f"Values are mean ± standard error; n is the number of tokens, items or seeds behind `{newest_spec.headline}`. "
             "One table per set of comparable settings.\n"]
    frames = []
    for index, ((name, version, _), group) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])), 1):
        spec = task_spec_of(group[0])
        group, superseded = _newest(group)
        names = list(spec.summary_metrics())
        frame = records_frame(group, names, n_of=spec.headline)
        settings = comparable_settings(group[0])
        frame["settings"] = json.dumps(settings, sort_keys=True, default=str)
        ascending = spec.metric(spec.headline).direction == "lower"
        # ranks stay within a hookpoint: encoders at different hookpoints are not rivals (rank restarts at each)
        frame["_at"] = [hookpoint_order(h if isinstance(h, str) else None) for h in frame["hookpoint"]]
        frame = frame.sort_values(spec.headline, ascending=ascending, na_position="last", kind="stable")
        frame = frame.sort_values("_at", kind="stable").drop(columns="_at").reset_index(drop=True)
        frame.insert(0, "rank", frame.groupby(frame["hookpoint"].fillna(""), sort=False).cumcount() + 1)
        frames.append(frame)
        # hookpoints only where there is a model; FLOPs per token and failed answers where an encoder reports them
        shown = [c for c in frame.columns if c.startswith(DISPLAY_PREFIX)]  # an encoder family's own columns
        columns = [c for c in ("hookpoint", *shown, "flops_per_token", "failed_answers") if frame[c].notna().any()]
        rank_of = {(row["encoder"], _text(row["hookpoint"])): i for i, row in frame.iterrows()}
        ranked = sorted(group, key=lambda r: rank_of[(r.encoder["label"], r.hookpoint or "")])
        rows = [[row["rank"], _linked(rec.encoder["label"], (links or {}).get(id(rec))), *[_cell(c, row[c]) for c in columns],
                 *[fmt(row[m], row[f"{m}_stderr"]) for m in names], row["n"]]
                for (i, row), rec in zip(frame.iterrows(), ranked)]
        headers = ["rank", "encoder", *[COLUMN_TITLES.get(c, c.removeprefix(DISPLAY_PREFIX)) for c in columns],
                   *names, "n"]
        parts.append(_heading(name, version, settings, spec, superseded) + "\n\n"
                     + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n")
        if out_dir is not None and (pairs := spec.tradeoffs):
            from saebench.plots import tradeoff_section

            directions = {m.name: m.direction for m in spec.metrics}
            if section := tradeoff_section(name, index, ranked, pairs, directions, out_dir):
                parts.append(section)
        if out_dir is not None and paths:
            from saebench.plots import curve_sections

            if section := curve_sections(name, index, [(r, paths[id(r)]) for r in ranked if id(r) in paths], out_dir):
                parts.append(section)
            from saebench.item_plots import item_sections  # benchmark tasks' per-item rows (details "kind": "item")

            if section := item_sections(name, index, [(r, paths[id(r)]) for r in ranked if id(r) in paths], out_dir):
                parts.append(section)
    import pandas as pd

    return "\n".join(parts), pd.concat(frames).to_csv(index=False)


def write_leaderboards(runs_dir: Path, out_dir: Path, task: str | None = None) -> list[Path]:
    """Write <task>.md, <task>.csv and <task>.html into `out_dir` for every task with records (or `task`), the
    plots they link, each shown record's JSON under records/<task>/, and index.html; returns the paths."""
    from saebench.html import write_site

    found, rejected = scan_record_files(runs_dir)
    every, paths = [rec for _, rec in found], {id(rec): path for path, rec in found}
    for path, reason in rejected:
        print(f"saebench: warning: skipped {path}: {reason}", file=sys.stderr)
    recs = [r for r in every if task is None or r.task["name"] == task]
    if not recs:
        what = f"records of task {task!r}" if task else "records"
        skipped = f" ({len(rejected)} unusable files skipped, named above)" if rejected else ""
        raise SaebenchError(f"no {what} under {runs_dir}{skipped}; run `saebench run ...` first or pass --runs")
    written, pages = [], {}
    for name in sorted({r.task["name"] for r in recs}):
        mine = [r for r in recs if r.task["name"] == name]
        links = _copy_records(mine, paths, Path(out_dir), name)
        md, csv = leaderboard_markdown(name, mine, paths, Path(out_dir), links)
        pages[name] = md
        for suffix, text in ((".md", md), (".csv", csv)):
            path = Path(out_dir) / f"{name}{suffix}"
            write_atomic(path, text)
            written.append(path)
        written.extend(Path(out_dir) / link for link in re.findall(rf"\]\(({re.escape(name)}-[^)]+\.png)\)", md))
    by_task: dict[str, list[RunRecord]] = {}
    for rec in every:  # the index lists every task with records, also when only one was rebuilt
        by_task.setdefault(rec.task["name"], []).append(rec)
    return written + write_site(Path(out_dir), pages, by_task)


def _copy_records(recs: list[RunRecord], paths: dict[int, Path], out_dir: Path, task: str) -> dict[int, str]:
    """Copy each record file to out_dir/records/<task>/ (replacing what an earlier build left there); returns the
    link to each, relative to out_dir, by id(record)."""
    folder = out_dir / "records" / task
    shutil.rmtree(folder, ignore_errors=True)
    links = {}
    for rec in recs:
        if (source := paths.get(id(rec))) is not None:
            write_atomic(folder / source.name, source.read_text())
            links[id(rec)] = f"records/{task}/{source.name}"
    return links
