"""Curves of records, rendered next to the leaderboard tables.

A task declares its curves in each result's ``extra["curves"]``: name -> {"x": field,
"plot": "line" | "table" | "heatmap", "metrics": [...], "scale": "log2" | "log10" (optional), "series": a
column that splits a line plot's points into one line per value (optional, e.g. truncation's "mode"),
"rows": what a heatmap's rows are (optional, default "spliced"), "note": a line under a heatmap's or
histogram's title (optional), "marks": x values a histogram marks (optional)}. The
points are rows of the record's details file with ``"curve": name``, holding x, each metric
and optionally ``<metric>_se``. Line curves become one PNG per comparable group (a panel per
metric, a line per encoder and hookpoint, each encoder's training context marked; an "overlay"
curve whose rows span x = first..last is drawn over it as range means); table
curves become markdown tables (a row per encoder and hookpoint, a column per x); heatmap
curves become one PNG per metric (rows: the records, columns: x); histogram curves one PNG with a
panel per record, the histogram of x over its rows (ce_kl's latent firing frequencies).
"""

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from tabulate import tabulate

from saebench.records import RunRecord
from saebench.report import encoder_display, hookpoint_order

LABELS = {"norm": "‖x‖", "mse": "MSE (mean over dims)", "fve": "FVE", "l0": "L0", "l1": "L1",
          "cos": "cos(x, x̂)", "dce": "ΔCE (nats)", "kl": "KL (nats)", "ce": "CE loss (nats)",
          "l0_kept": "active latents kept per token", "recall": "recall (active latents)",
          "specificity": "specificity (inactive latents)",
          "expected_active": "expected predicted-active latents in the dictionary"}


def row_label(rec: RunRecord) -> str:
    return rec.encoder["label"] if rec.hookpoint is None else f"{rec.encoder['label']} @ {rec.hookpoint}"


def load_curves(rec: RunRecord, path: Path) -> dict[str, list[dict[str, Any]]]:
    """The details rows of each curve the record declares (empty when it has none or the file is gone)."""
    declared = rec.extra.get("curves") or {}
    if not declared or not rec.details_file:
        return {}
    details = path.parent / rec.details_file
    if not details.exists():
        return {}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in declared}
    for line in details.read_text().splitlines():
        row = json.loads(line)
        if row.get("curve") in out:
            out[row["curve"]].append(row)
    return out


def curve_sections(task: str, index: int, group: list[tuple[RunRecord, Path]], out_dir: Path) -> str:
    """Markdown (and PNG files in `out_dir`) for the curves of one comparable group's records."""
    declared: dict[str, dict[str, Any]] = {}
    for rec, _ in group:
        declared.update(rec.extra.get("curves") or {})
    if not declared:
        return ""
    curves = [(rec, load_curves(rec, path)) for rec, path in group]
    parts = []
    for name, spec in declared.items():
        have = [(rec, c[name]) for rec, c in curves if c.get(name)]
        if not have:
            continue
        if spec["plot"] == "line":  # one figure per encoder, a line per hookpoint
            overlay = spec.get("overlay")
            for label in dict.fromkeys(rec.encoder["label"] for rec, _ in have):
                mine = sorted([(rec, c) for rec, c in curves if c.get(name) and rec.encoder["label"] == label],
                              key=lambda item: hookpoint_order(item[0].hookpoint))
                file = f"{task}-{index}-{name}-{_slug(label)}.png"
                overlays = {k: c[overlay] for k, (_, c) in enumerate(mine) if overlay and c.get(overlay)}
                _line_plot([(rec, c[name]) for rec, c in mine], spec, out_dir / file,
                           f"{task}: {label}, metrics by {spec['x']}", overlays)
                parts.append(f"![{task} {label} by {spec['x']}]({file})")
        elif spec["plot"] == "table":
            for metric in spec["metrics"]:
                parts.append(_table(have, spec, metric))
        elif spec["plot"] == "heatmap":
            for metric in spec["metrics"]:
                file = f"{task}-{index}-{name}-{metric}.png"
                note = f"\n{spec['note']}" if spec.get("note") else ""
                _heatmap(have, spec, metric, out_dir / file, f"{task}: {metric}{note}")
                parts.append(f"![{task} {metric}]({file})")
        elif spec["plot"] == "histogram":
            file = f"{task}-{index}-{name}.png"
            _histogram(have, spec, out_dir / file, f"{task}: {spec['x']} of each encoder's latents")
            parts.append(f"![{task} {name} histogram]({file})")
    return "\n\n".join(parts) + "\n" if parts else ""


def _suptitle(fig, title: str, size: float) -> int:
    """The figure's title wrapped to its width (encoder specs make long titles); returns its line count."""
    lines = [w for line in title.split("\n") for w in textwrap.wrap(line, int(fig.get_figwidth() * 120 / size))]
    fig.suptitle("\n".join(lines), fontsize=size)
    return len(lines)


def _line_plot(have, spec: dict[str, Any], path: Path, title: str,
               overlays: dict[int, list[dict[str, Any]]] | None = None) -> None:
    """A panel per metric; colour = hookpoint, line style = encoder; `overlays` (by record index) are
    range means drawn as markers over each range's geometric middle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = spec["metrics"]
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    hookpoints = sorted({rec.hookpoint for rec, _ in have}, key=hookpoint_order)
    encoders = list(dict.fromkeys(rec.encoder["label"] for rec, _ in have))
    styles = ["-", "--", ":", "-."]
    series_key = spec.get("series")  # one line per value of this column (e.g. truncation's top / random)
    series = list(dict.fromkeys(p.get(series_key) for _, pts in have for p in pts)) if series_key else [None]
    positive = spec.get("scale") in ("log2", "log10")
    for k, (rec, points) in enumerate(have):
        for s_index, value in enumerate(series):
            color = colors[hookpoints.index(rec.hookpoint) % len(colors)]
            style = styles[encoders.index(rec.encoder["label"]) % len(styles)]
            if series_key and len(hookpoints) == 1:
                color = colors[s_index % len(colors)]
            elif series_key:
                style = styles[s_index % len(styles)]
            pts = [p for p in points if not p.get("sink") and (not positive or p["x"] > 0)
                   and (series_key is None or p.get(series_key) == value)]
            label = row_label(rec) if series_key is None else f"{row_label(rec)}: {series_key} {value}"
            _plot_series(axes, metrics, rec, pts, color, style, label, overlays.get(k) if overlays else None,
                         marked=series_key is not None)
    for ax, metric in zip(axes.flat, metrics):
        ax.set_title(LABELS.get(metric, metric), fontsize=10)
        if spec.get("scale") in ("log2", "log10"):
            ax.set_xscale("log", base=2 if spec["scale"] == "log2" else 10)
        ax.set_xlabel(spec["x"], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no values\n(encoders without latents)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:  # the panel with the most lines has every encoder
        if len(ax.get_legend_handles_labels()[1]) > len(labels):
            handles, labels = ax.get_legend_handles_labels()
    notes = ["dotted vertical: the encoder's training context"] if any(r.extra.get("training_context") for r, _ in have) \
        else []
    if overlays:
        notes.append("markers: bucket means, thin lines: single positions")
    note = "; ".join(notes) or None
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8,
               title=note, title_fontsize=8)
    lines = _suptitle(fig, title, 11)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(labels) / 3), 1, 0.97 - 0.05 * (lines - 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_series(axes, metrics, rec: RunRecord, pts, color, style, label: str, smooth, marked: bool) -> None:
    """One record's points (one series of them) on every metric's panel, with bucket means over them."""
    xs = [p["x"] for p in pts]
    for ax, metric in zip(axes.flat, metrics):
        ys = [p.get(metric) for p in pts]
        if all(y is None for y in ys):
            continue
        ax.plot(xs, [math.nan if y is None else y for y in ys], color=color, ls=style, lw=1.2 if marked else 0.7,
                alpha=0.35 if smooth else 0.9, label=None if smooth else label,
                marker="o" if marked and not smooth else None, ms=3)
        if smooth:
            mids = [math.sqrt(b["first"] * b["last"]) for b in smooth]
            ax.plot(mids, [math.nan if b.get(metric) is None else b[metric] for b in smooth], color=color,
                    ls=style, lw=1.6, marker="o", ms=3, label=label)
        trained = rec.extra.get("training_context")
        if trained:
            ax.axvline(trained, color=color, ls=":", lw=1.0, alpha=0.8)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _table(have, spec: dict[str, Any], metric: str) -> str:
    columns = list(dict.fromkeys(p["x"] for _, points in have for p in points))
    rows = []
    for rec, points in have:
        by_x = {p["x"]: p.get(metric) for p in points}
        rows.append([row_label(rec)] + [_short(by_x.get(x)) for x in columns])
    title = f"**{LABELS.get(metric, metric)} by {spec['x']}** (mean over the {spec['x']}'s positions; standard " \
            "errors in the details files)"
    return title + "\n\n" + tabulate(rows, headers=["encoder @ hookpoint", *map(str, columns)], tablefmt="github",
                                     disable_numparse=True)


def _heatmap(have, spec: dict[str, Any], metric: str, path: Path, title: str) -> None:
    """Rows: the records, columns: x; both in forward order where points name their hookpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    have = sorted(have, key=lambda item: hookpoint_order(item[0].hookpoint))
    where = {p["x"]: p.get("hookpoint", "") for _, points in have for p in points}
    columns = sorted(where, key=lambda x: hookpoint_order(where[x]))
    grid = np.full((len(have), len(columns)), np.nan)
    errors = np.full_like(grid, np.nan)
    for i, (_, points) in enumerate(have):
        for p in points:
            if p.get(metric) is not None:
                grid[i, columns.index(p["x"])] = p[metric]
                errors[i, columns.index(p["x"])] = p.get(f"{metric}_se") or np.nan
    fig, ax = plt.subplots(figsize=(max(6.0, 3.0 + 1.3 * len(columns)), max(2.5, 1.4 + 0.6 * len(have))))
    limit = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() and np.nanmax(np.abs(grid)) > 0 else 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            text = f"{value:+.3f}" + (f"\n± {errors[i, j]:.3f}" if np.isfinite(errors[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > 0.6 * limit else "black")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(have)), [row_label(rec) for rec, _ in have], fontsize=8)
    ax.set_xlabel(spec["x"], fontsize=9)
    ax.set_ylabel(spec.get("rows", "spliced"), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}"


def tradeoff_section(task: str, index: int, group: list[RunRecord], pairs, directions: dict[str, str],
                     out_dir: Path) -> str:
    """Markdown (and a PNG per (x, y) pair in `out_dir`) plotting y against x, one point per record.

    Records without x but with y whose encoder has no latents at one hookpoint (identity, zero, mean)
    are horizontal reference lines; any other record without both values is named under the plot.
    """
    parts = []
    for x, y in pairs:
        points = [r for r in group if r.metrics.get(x) is not None and r.metrics.get(y) is not None]
        if not points:
            continue
        lines = [r for r in group if r.metrics.get(x) is None and r.metrics.get(y) is not None
                 and r.encoder.get("d_latent") is None and r.hookpoint and not re.search(r"[{+]", r.hookpoint)]
        missing = [r for r in group if r not in points and r not in lines]
        file = f"{task}-{index}-tradeoff-{_slug(y)}-vs-{_slug(x)}.png"
        off_axis = _tradeoff_plot(points, lines, x, y, directions.get(y, "higher"), out_dir / file,
                                  f"{task}: {y} against {x}")
        parts.append(f"![{task} {y} against {x}]({file})")
        notes = []
        if off_axis:
            notes.append("off the axis: " + ", ".join(f"{row_label(r)} {_short(r.metrics[y])}" for r in off_axis))
        if missing:
            notes.append(f"not drawn (no {x} or {y}): " + ", ".join(row_label(r) for r in missing))
        if notes:
            parts.append("*" + "; ".join(notes) + "*")
    return "\n\n".join(parts) + "\n" if parts else ""


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both x (lower is better) and y, sorted by x."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def frontier_groups(points: list[RunRecord]) -> dict[tuple[str | None, tuple[str, ...]], list[int]]:
    """Indices of `points` by (hookpoint, the encoder's display values), in forward order: one Pareto frontier each.

    Encoders spliced at different hookpoints answer different questions (an mlp_out SAE is no rival of a
    resid_post one at the same layer), and the values an encoder family displays beside its label (an SAE's
    architecture, an LLM simulator's model) name the design whose sparsity-fidelity trade-off a frontier traces, as
    Anthropic's circuits update compares TopK, Gated and standard SAEs on the L0/MSE trade-off.
    """
    groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
    for k, rec in enumerate(points):
        display = encoder_display(rec)
        groups.setdefault((rec.hookpoint, tuple(str(display[key]) for key in sorted(display))), []).append(k)
    return dict(sorted(groups.items(), key=lambda kv: (hookpoint_order(kv[0][0]), kv[0][1])))


def frontier_label(hookpoint: str | None, display: tuple[str, ...]) -> str:
    """'frontier topk @ layers.15.resid_post' (the display values, then the hookpoint where there is one)."""
    return " ".join(["frontier", *display] + ([f"@ {hookpoint}"] if hookpoint else []))


def _tradeoff_plot(points: list[RunRecord], lines: list[RunRecord], x: str, y: str, direction: str, path: Path,
                   title: str) -> list[RunRecord]:
    """Scatter with error bars, a Pareto frontier per frontier_groups group (its points in its colour), and
    reference lines inside the points' y range; returns the reference records left off the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, styles = "osD^v<>pPX*h", ["-", "--", ":", "-."]
    xy = [(r.metrics[x], r.metrics[y]) for r in points]
    groups = frontier_groups(points)
    for n, ((hookpoint, display), members) in enumerate(groups.items()):
        color = colors[n % len(colors)]
        for m, k in enumerate(members):
            ax.errorbar(*xy[k], xerr=points[k].stderr.get(x) or None, yerr=points[k].stderr.get(y) or None,
                        fmt=markers[m % len(markers)], color=color, ms=7, capsize=2, label=row_label(points[k]))
        front = [members[i] for i in pareto_front([xy[k] for k in members], direction != "lower")]
        if len(front) > 1:
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color=color, lw=1.2,
                    ls=styles[n % len(styles)], zorder=0, drawstyle="steps-post",
                    label=frontier_label(hookpoint, display))
    ys = [v for _, v in xy]
    low, high = min(ys), max(ys)
    pad = 0.15 * (high - low) if high > low else 0.05 * (abs(high) or 1.0)
    low, high = low - pad, high + pad
    # the axis is the points' range: reference lines outside it would squash the points together, so they are
    # named under the plot instead; a single point (no range of its own) is shown among the references of
    # its magnitude (an SAE's ce_loss_recovered between zero ablation's 0 and identity's 1)
    reach = 0.0 if max(ys) > min(ys) else abs(ys[0]) or 1.0
    shown = [r for r in lines if low - reach <= r.metrics[y] <= high + reach]
    off = [r for r in lines if r not in shown]
    if shown:
        values = [r.metrics[y] for r in shown]
        span = max(high, *values) - min(low, *values)
        low, high = min(low, min(values) - 0.05 * span), max(high, max(values) + 0.05 * span)
    for k, rec in enumerate(shown):
        ax.axhline(rec.metrics[y], color=colors[(len(groups) + k) % len(colors)], ls="--", lw=1, label=row_label(rec))
    ax.set_ylim(low, high)
    xs = [v for v, _ in xy]
    if min(xs) >= 0:  # a cost such as L0: from 0, so equal sparsities read as equal
        ax.set_xlim(0, 1.15 * max(xs) if max(xs) > 0 else 1.0)
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel(LABELS.get(x, x) + " (lower: sparser)")
    ax.set_ylabel(f"{LABELS.get(y, y)} ({direction} is better)" if direction != "none" else LABELS.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend outside the axes names every frontier
    plt.close(fig)
    return off


def _histogram(have, spec: dict[str, Any], path: Path, title: str) -> None:
    """A panel per record, grouped as the trade-off frontiers are (hookpoint, then displayed values such as an SAE's
    architecture): the histogram of x over its rows (log10 of x for scale "log10", 0.1-decade bins, rows at x = 0
    counted in the panel's title instead), spec["marks"] drawn as dashed lines and counted above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [have[k] for members in frontier_groups([rec for rec, _ in have]).values() for k in members]
    field, marks, log = spec["x"], sorted(spec.get("marks") or [], reverse=True), spec.get("scale") == "log10"
    values = [[p[field] for p in points if p.get(field) is not None] for _, points in have]
    positive = [v for vals in values for v in vals if v > 0]
    low = math.floor(math.log10(min(positive))) if positive else -6
    high = max(0, math.ceil(math.log10(max(positive)))) if positive else 0
    bins = [low + i / 10 for i in range(10 * (high - low) + 1)] if log else 30
    cols = min(4, len(have))
    rows = math.ceil(len(have) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False, sharex=True)
    for ax, (rec, _), vals in zip(axes.flat, have, values):
        shown = [math.log10(v) for v in vals if v > 0] if log else vals
        ax.hist(shown, bins=bins, color="tab:blue")
        for mark in marks:
            ax.axvline(math.log10(mark) if log else mark, color="tab:red", ls="--", lw=0.9)
        counts = [f"> {m:g}: {sum(v > m for v in vals)}" for m in marks]
        if log:
            counts.append(f"never: {len(vals) - len(shown)}")
        label = row_label(rec)  # long option strings have no spaces to wrap at: cut them every 48 characters
        lines = [label[i:i + 48] for i in range(0, len(label), 48)]
        ax.set_title("\n".join([*lines, f"{', '.join(counts)} of {len(vals)}"]), fontsize=7)
        ax.set_xlabel(f"log10 {field}" if log else field, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(have):]:
        ax.axis("off")
    _suptitle(fig, title + (f"\n{spec['note']}" if spec.get("note") else ""), 10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
