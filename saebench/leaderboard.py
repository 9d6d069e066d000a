"""Leaderboards: records -> pandas -> tabulate markdown (+ CSV), one table per comparable group.

Records are comparable only within one (task, task version, model, model dtype, hookpoint):
task versions and dtypes are never mixed, and each table's heading names its dtype. Rows are
ranked by the task's headline metric in its better direction.
"""

import sys
from pathlib import Path

from tabulate import tabulate

from saebench.errors import SaebenchError
from saebench.records import RunRecord, scan_records, write_atomic
from saebench.report import fmt, records_frame
from saebench.runner import resolve_task


def _group_key(rec: RunRecord) -> tuple:
    return (rec.task["name"], rec.task["version"], rec.model["id"], rec.model.get("dtype"), rec.hookpoint)


def _latest(recs: list[RunRecord]) -> list[RunRecord]:
    """One record per encoder label in a group: the one with the most tokens (ties: last read)."""
    best: dict[str, RunRecord] = {}
    for rec in recs:
        label = rec.encoder["label"]
        n = max((v for v in rec.n.values() if v is not None), default=0)
        old = best.get(label)
        if old is None or n >= max((v for v in old.n.values() if v is not None), default=0):
            best[label] = rec
    return list(best.values())


def leaderboard_markdown(task: str, recs: list[RunRecord]) -> tuple[str, str]:
    """Markdown and CSV text for one task's records (all groups)."""
    spec = resolve_task(task).spec
    headline = spec.metric(spec.headline)
    groups: dict[tuple, list[RunRecord]] = {}
    for rec in recs:
        groups.setdefault(_group_key(rec), []).append(rec)
    parts = [f"# {task} leaderboard\n\nRanked by `{spec.headline}` ({headline.direction} is better). "
             "Values are mean ± standard error (clustered by context); n is the number of tokens or items.\n"]
    frames = []
    for (name, version, model, dtype, hookpoint), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        group = _latest(group)
        names = list(spec.summary_metrics())
        frame = records_frame(group, names)
        ascending = headline.direction == "lower"
        frame = frame.sort_values(spec.headline, ascending=ascending, na_position="last").reset_index(drop=True)
        frames.append(frame)
        rows = [[i + 1, row["encoder"], *[fmt(row[m], row[f"{m}_stderr"]) for m in names], row["n"]]
                for i, row in frame.iterrows()]
        parts.append(f"## {name} v{version} · {model} ({dtype}) · {hookpoint}\n\n"
                     + tabulate(rows, headers=["rank", "encoder", *names, "n"], tablefmt="github",
                                  disable_numparse=True) + "\n")
    import pandas as pd

    return "\n".join(parts), pd.concat(frames).to_csv(index=False)


def write_leaderboards(runs_dir: Path, out_dir: Path, task: str | None = None) -> list[Path]:
    """Write <task>.md and <task>.csv into `out_dir` for every task with records; returns the paths."""
    recs, rejected = scan_records(runs_dir)
    for path, reason in rejected:
        print(f"saebench: warning: skipped {path}: {reason}", file=sys.stderr)
    if task is not None:
        recs = [r for r in recs if r.task["name"] == task]
    if not recs:
        what = f"records of task {task!r}" if task else "records"
        skipped = f" ({len(rejected)} unusable files skipped, named above)" if rejected else ""
        raise SaebenchError(f"no {what} under {runs_dir}{skipped}; run `saebench run ...` first or pass --runs")
    written = []
    for name in sorted({r.task["name"] for r in recs}):
        md, csv = leaderboard_markdown(name, [r for r in recs if r.task["name"] == name])
        for suffix, text in ((".md", md), (".csv", csv)):
            path = Path(out_dir) / f"{name}{suffix}"
            write_atomic(path, text)
            written.append(path)
    return written
