"""Tables of records, shared by `saebench run` output and leaderboards."""

import math
from collections.abc import Sequence

import pandas as pd
from tabulate import tabulate

from saebench.records import RunRecord


def fmt(value: float | None, err: float | None = None) -> str:
    """'0.9612 ± 0.0021', or '—' for a missing value."""
    if value is None or math.isnan(value):  # pandas turns a missing value into NaN
        return "—"
    value = value + 0.0  # no "-0"
    text = f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if err is not None and not math.isnan(err):
        text += f" ± {err:.2g}"
    return text


DISPLAY_PREFIX = "encoder_"
"""Frame columns taken from an encoder spec's params["display"] (e.g. encoder_simulator)."""


def records_frame(recs: Sequence[RunRecord], metrics: Sequence[str] | None = None,
                  n_of: str | None = None) -> pd.DataFrame:
    """One row per record: encoder, task, model, hookpoint, then value and stderr per metric.

    The `n` column is the n of metric `n_of` (default: the largest n of the record).
    """
    rows = []
    for rec in recs:
        names = metrics or list(rec.metrics)
        model = rec.model or {}
        row = {"task": rec.task["name"], "task_version": rec.task["version"], "model": model.get("id"),
               "dtype": model.get("dtype"), "hookpoint": rec.hookpoint, "encoder": rec.encoder["label"],
               "flops_per_token": (rec.extra.get("flops") or {}).get("encode_per_token")}
        # what an encoder family asks leaderboards to show beside its label (llm_sim: simulator, explanations)
        row |= {DISPLAY_PREFIX + k: str(v) for k, v in (rec.encoder.get("params") or {}).get("display", {}).items()}
        for name in names:
            row[name] = rec.metrics.get(name)
            row[f"{name}_stderr"] = rec.stderr.get(name)
        row["n"] = rec.n.get(n_of) if n_of else max((v for v in rec.n.values() if v is not None), default=None)
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(recs: Sequence[RunRecord]) -> str:
    """A compact table of what a run produced (headline metrics first)."""
    from saebench.runner import resolve_task

    out = []
    for task_name in dict.fromkeys(r.task["name"] for r in recs):
        group = [r for r in recs if r.task["name"] == task_name]
        spec = resolve_task(task_name).spec
        names = [m for m in spec.summary_metrics() if any(r.metrics.get(m) is not None for r in group)]
        placed = any(r.hookpoint for r in group)
        rows = [[r.encoder["label"], *([r.hookpoint] if placed else [])]
                + [fmt(r.metrics.get(n), r.stderr.get(n)) for n in names] for r in group]
        n = max((v for r in group for v in r.n.values() if v is not None), default=0)
        where = f"on {group[0].model['id']}" if group[0].model else "without a language model"
        out.append(f"{task_name} (v{spec.version}) {where}, n = {n}\n"
                   + tabulate(rows, headers=["encoder", *(["hookpoint"] if placed else []), *names],
                              tablefmt="github", disable_numparse=True))
    return "\n\n".join(out)
