"""Tables of records, shared by `saebench run` output and leaderboards."""

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from tabulate import tabulate

from saebench.records import RunRecord, TaskSpec


def fmt(value: float | None, err: float | None = None) -> str:
    """'0.9612 ± 0.0021', or '—' for a missing value."""
    if value is None or math.isnan(value):  # pandas turns a missing value into NaN
        return "—"
    value = value + 0.0  # no "-0"
    text = f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    if err is not None and not math.isnan(err):
        text += f" ± {err:.2g}"
    return text


def hookpoint_order(hookpoint: str | None) -> tuple:
    """Sort key of a hookpoint name by layer ('layers.5.resid_post' before 'layers.15.mlp_out'), then name."""
    hookpoint = hookpoint or ""
    parts = hookpoint.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1, hookpoint)


def encoder_display(rec: RunRecord) -> dict[str, Any]:
    """What the record's encoder asks leaderboards to show beside its label: its spec's display values (an SAE's
    architecture), else the display its family keeps among its params (llm_sim: simulator, explanations)."""
    return rec.encoder.get("display") or (rec.encoder.get("params") or {}).get("display") or {}


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
        # answers of an encoder that can fail (an LLM simulator's; answers.FAILURE_KEYS): failed + unparsed of asked
        answers = rec.extra.get("failed_answers")
        row["failed_answers"] = f"{answers['failed'] + answers['unparsed']} of {answers['asked']}" if answers else None
        # what an encoder family asks leaderboards to show beside its label (llm_sim: simulator, explanations)
        row |= {DISPLAY_PREFIX + k: str(v) for k, v in encoder_display(rec).items()}
        for name in names:
            row[name] = rec.metrics.get(name)
            row[f"{name}_stderr"] = rec.stderr.get(name)
        row["n"] = rec.n.get(n_of) if n_of else max((v for v in rec.n.values() if v is not None), default=None)
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(recs: Sequence[RunRecord]) -> str:
    """A compact table of what a run produced (headline metrics first), from what the records say of their task."""
    out = []
    for task_name in dict.fromkeys(r.task["name"] for r in recs):
        group = [r for r in recs if r.task["name"] == task_name]
        spec = TaskSpec.from_dict(group[0].task)
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


def feature_tables(recs) -> str:
    """The most helpful / harmful latents of each record that lists them in extra.features (the benchmark
    tasks' per-latent Δlog p scores), as `saebench run` prints them."""
    out = []
    for rec in recs:
        top = (rec.extra or {}).get("features")
        if not top:
            continue
        if top.get("ranked_by") != "controlled_delta_logp":
            continue  # a record from before the controlled score: its ranking is the count score's
        for kind in ("most_helpful", "most_harmful"):
            rows = [(r["feature"], fmt(r["controlled_delta_logp"], r["controlled_se"]), r["score"], r["n_prompts"],
                     f"{r['mean_delta_logp']:.3f}") for r in top[kind]]
            out.append(f"{rec.task['name']} / {rec.encoder['label']}: {len(rows)} {kind.replace('_', ' ')} latents, "
                       "ranked by Δlog p where active minus where not (frequency-controlled), among latents "
                       f"active on at least {top.get('min_prompts', 1)} prompts\n"
                       + tabulate(rows, headers=("latent", "controlled Δlog p", "count score", "prompts",
                                                 "mean Δlog p where active"), tablefmt="github"))
    return "\n\n".join(out)
