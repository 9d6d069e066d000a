"""Per-item plots of the benchmark tasks (lambada, cbt, lm_eval:<task>), after Anders & Bloom's LessWrong
post "Examining Language Model Performance with Reconstructed Activations using Sparse Autoencoders" (2024).

`saebench leaderboard` draws them for one comparable group of records (one table) from the
``"kind": "item"`` and ``"kind": "feature"`` rows of each record's details file:

- Δlog p(answer) against the item's reconstruction MSE, a point per item coloured by its correctness
  class (both correct, both wrong, only clean correct, only spliced correct), with each class's marginal
  distributions above and beside it: one figure per encoder and hookpoint (their Lambada and CBT scatters);
- with several hookpoints: Δlog p and ||x|| per item as strip plots over the hookpoints (one figure per
  encoder), and accuracy, -log p(answer) and prompt CE per hookpoint with the clean model as reference
  (one figure for the group);
- for encoders with latents: histograms of each latent's mean Δlog p over the prompts where it is active
  and of its ±1 count score, a colour per hookpoint (one figure per encoder).

Records written before the details rows held MSE and the correctness class (benchmark task versions 1)
draw nothing here.
"""

import json
import re
from pathlib import Path
from typing import Any

from saebench.plots import row_label
from saebench.records import RunRecord
from saebench.report import hookpoint_order

CLASSES = {"both_correct": ("both correct", "tab:green"), "both_wrong": ("both wrong", "tab:red"),
           "only_clean_correct": ("only clean correct", "tab:orange"),
           "only_spliced_correct": ("only spliced correct", "tab:blue")}
"""Correctness class (details field `outcome`) -> legend text and colour, as in Anders & Bloom's scatters."""
DELTA = "Δlog p(answer), spliced − clean (nats)"


def _slug(text: str) -> str:
    """`text` as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def load_details(rec: RunRecord, path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The item rows that carry a correctness class, and the feature rows, of a record's details file."""
    if not rec.details_file or not (path.parent / rec.details_file).exists():
        return [], []
    items, features = [], []
    for line in (path.parent / rec.details_file).read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "item" and "outcome" in row:
            items.append(row)
        elif row.get("kind") == "feature":
            features.append(row)
    return items, features


def item_sections(task: str, index: int, group: list[tuple[RunRecord, Path]], out_dir: Path) -> str:
    """Markdown (and PNG files in `out_dir`) of the per-item plots of one comparable group's records."""
    loaded = [(rec, *load_details(rec, path)) for rec, path in group]
    loaded = sorted([entry for entry in loaded if entry[1]], key=lambda e: hookpoint_order(e[0].hookpoint))
    if not loaded:
        return ""
    parts = []
    stem = f"{task}-{index}-items"
    for rec, items, _ in loaded:
        if any(r.get("mse") for r in items):  # the identity reconstructs exactly: nothing to scatter
            file = f"{stem}-scatter-{_slug(row_label(rec))}.png"
            _scatter(items, out_dir / file, f"{task}: {row_label(rec)}, {len(items)} items")
            parts.append(f"![{task} {row_label(rec)}: Δlog p against MSE]({file})")
    labels = list(dict.fromkeys(rec.encoder["label"] for rec, _, _ in loaded))
    if len({rec.hookpoint for rec, _, _ in loaded}) > 1:
        for label in labels:
            mine = [(rec, items) for rec, items, _ in loaded if rec.encoder["label"] == label]
            if len(mine) > 1:
                file = f"{stem}-strips-{_slug(label)}.png"
                _strips(mine, out_dir / file, f"{task}: {label}, per item and hookpoint")
                parts.append(f"![{task} {label}: Δlog p and ‖x‖ per hookpoint]({file})")
        file = f"{stem}-by-hookpoint.png"
        _by_hookpoint([(rec, items) for rec, items, _ in loaded], out_dir / file, f"{task}: by hookpoint")
        parts.append(f"![{task}: accuracy and CE per hookpoint]({file})")
    for label in labels:
        mine = [(rec, features) for rec, _, features in loaded if rec.encoder["label"] == label and features]
        if mine:
            file = f"{stem}-features-{_slug(label)}.png"
            _feature_histograms(mine, out_dir / file, f"{task}: {label}, latents active on the prompts")
            parts.append(f"![{task} {label}: helpful and harmful latents]({file})")
    if not parts:
        return ""
    head = ("**Per item** (after Anders & Bloom; colours: " + ", ".join(text for text, _ in CLASSES.values())
            + "; the values are in each record's details file)")
    return "\n\n".join([head, *parts]) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long titles and outside legends stay whole
    _pyplot().close(fig)


def _scatter(items: list[dict[str, Any]], path: Path, title: str) -> None:
    """Δlog p against MSE, a colour per correctness class, each class's marginal densities on the sides."""
    plt = _pyplot()
    fig = plt.figure(figsize=(7.0, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1.2), height_ratios=(1.2, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    side = fig.add_subplot(grid[1, 1], sharey=ax)
    import numpy as np

    points = [r for r in items if r.get("mse") is not None]
    mses = [r["mse"] for r in points]
    # a few items of very large norm (kept out of SAE training) can sit orders of magnitude right of the rest:
    # a log axis keeps the bulk readable
    log_x = bool(mses) and min(mses) > 0 and max(mses) > 30 * min(mses)
    x_edges = (np.geomspace(min(mses), max(mses), 31) if log_x  # shared: the classes' densities compare
               else np.histogram_bin_edges(mses, bins=30))
    y_edges = np.histogram_bin_edges([r["delta_logp"] for r in points], bins=30)
    for key, (text, color) in CLASSES.items():
        mine = [r for r in points if r["outcome"] == key]
        if not mine:
            continue
        xs, ys = [r["mse"] for r in mine], [r["delta_logp"] for r in mine]
        ax.scatter(xs, ys, s=7, alpha=0.5, color=color, edgecolors="none", label=f"{text} ({len(mine)})")
        if len(mine) > 1:  # a density of one point says nothing
            top.hist(xs, bins=x_edges, density=True, histtype="step", color=color, lw=1.2)
            side.hist(ys, bins=y_edges, density=True, histtype="step", color=color, lw=1.2, orientation="horizontal")
    ax.axhline(0, color="black", lw=0.8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("reconstruction MSE at the hookpoint, mean over the prompt's positions"
                  + (" (log scale)" if log_x else ""), fontsize=9)
    ax.set_ylabel(DELTA, fontsize=9)
    ax.grid(alpha=0.3)
    corner = fig.add_subplot(grid[0, 1])
    corner.axis("off")
    corner.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="center", title="items (n)", title_fontsize=8,
                  markerscale=2, frameon=False)
    top.set_ylabel("density", fontsize=8)
    side.set_xlabel("density", fontsize=8)
    for a in (ax, top, side):
        a.tick_params(labelsize=8)
    top.tick_params(labelbottom=False)
    side.tick_params(labelleft=False)
    top.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.94, bottom=0.09)
    _save(fig, path)


def _strips(mine: list[tuple[RunRecord, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Δlog p and ||x|| of every item at each hookpoint (jittered points, the mean as a black bar)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.5 + 0.6 * len(mine)), 7.6), sharex=True)
    gen = np.random.default_rng(0)
    norm = "‖x‖ at the hookpoint, mean over the prompt"
    for ax, field, label in ((axes[0], "delta_logp", DELTA), (axes[1], "norm", norm)):
        for k, (_, items) in enumerate(mine):
            values = [r[field] for r in items if r.get(field) is not None]
            if not values:
                continue
            colors = [CLASSES[r["outcome"]][1] for r in items if r.get(field) is not None]
            ax.scatter(k + gen.uniform(-0.3, 0.3, len(values)), values, s=5, alpha=0.35, c=colors, edgecolors="none")
            ax.plot([k - 0.35, k + 0.35], [float(np.mean(values))] * 2, color="black", lw=2)
        ax.set_xticks(range(len(mine)), [rec.hookpoint or "" for rec, _ in mine], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=9, wrap=True)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].axhline(0, color="gray", lw=0.8)
    fig.suptitle(f"{title}\npoints coloured by correctness class; black bars: means", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _mean(items: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in items if r.get(field) is not None]
    return sum(values) / len(values) if values else None


def _by_hookpoint(have: list[tuple[RunRecord, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Accuracy, -log p(answer) and prompt CE per hookpoint: a line per encoder, the clean model dashed."""
    plt = _pyplot()
    hookpoints = sorted({rec.hookpoint for rec, _ in have}, key=hookpoint_order)
    labels = list(dict.fromkeys(rec.encoder["label"] for rec, _ in have))
    fig, axes = plt.subplots(1, 3, figsize=(3 * max(3.7, 0.45 * len(hookpoints)), 4.2))
    panels = (("accuracy", "acc", None), ("mean −log p(answer) (nats)", None, "logp"),
              ("prompt CE (nats)", "ce_prompt", None))  # (title, record metric, or else details field)
    for ax, (name, metric, field) in zip(axes, panels):
        for label in [None, *labels]:  # None: the clean model, the same at every hookpoint's records
            xs, ys, es = [], [], []
            for k, hp in enumerate(hookpoints):
                at = [(r, items) for r, items in have if r.hookpoint == hp and label in (None, r.encoder["label"])]
                if not at:
                    continue
                rec, items = at[0]
                suffix = "_clean" if label is None else ""
                if metric is not None:
                    y, e = rec.metrics.get(metric + suffix), rec.stderr.get(metric + suffix)
                else:
                    y, e = _mean(items, field + suffix), None
                    y = None if y is None else -y
                if y is not None:
                    xs.append(k)
                    ys.append(y)
                    es.append(e or 0.0)
            style = {"color": "black", "ls": "--", "label": "clean"} if label is None else \
                {"marker": "o", "label": label}
            ax.errorbar(xs, ys, yerr=es, ms=4, capsize=2, lw=1.2, **style)
        ax.set_xticks(range(len(hookpoints)), hookpoints, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (error bars: standard errors)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _feature_histograms(mine: list[tuple[RunRecord, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Histograms over latents of mean Δlog p where active and of the ±1 count score, a colour per hookpoint."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10.5, 6.4))
    cmap = plt.get_cmap("viridis")
    for ax, field, label in ((axes[0], "mean_delta_logp", "mean Δlog p(answer) over the prompts where the latent is "
                                                          "active (nats)"),
                             (axes[1], "score", "count score: #(Δlog p ≥ 0) − #(Δlog p < 0) over those prompts")):
        every = [r[field] for _, rows in mine for r in rows if r.get(field) is not None]
        if not every:
            continue
        edges = np.histogram_bin_edges(every, bins=50)
        for k, (rec, rows) in enumerate(mine):
            color = cmap(k / max(1, len(mine) - 1) * 0.9)
            ax.hist([r[field] for r in rows if r.get(field) is not None], bins=edges, histtype="step", lw=1.4,
                    color=color, label=f"{rec.hookpoint} ({len(rows)} latents)")
        ax.axvline(0, color="black", lw=1.0)
        ax.set_yscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("latents (log scale)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8, title="hookpoint",
               title_fontsize=8)
    fig.suptitle(f"{title}\nright of the black line: helpful on average", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.74, 1))
    _save(fig, path)
