"""What the synthetic task's records draw: the compressed-sensing boundary, the grid and the sparsity trade-off.

O'Neill et al. (2024, section 4.4) draw the latent-MCC gap over (N, M, K) with a black dashed line,
"regimes where compressed sensing theory predicts recoverability (above and to the left of the
black dashed line)", from their eq. (1). The source text saebench works from lost that equation, so
saebench draws the standard bound (Donoho 2006; Candès 2008): recovery of K-sparse codes of N
sources from M random measurements when M >= C K ln(N / K), with C = 1 (CS_CONSTANT), saebench's
choice and not the paper's constant. Laid out as the authors' scaling-law experiment
(github.com/charlieoneill11/sparse-inference, experiments/scaling_laws.py at commit 02b2109: N on a
log axis, M, one K per figure), the recoverable side is above (more measurements) and to the left
(fewer sources) of the line, as the paper says of its figure.

The leaderboard shows the grid as saebench.plots' heatmap (each cell marked ✓ / ✗ by the bound); the
002-style figures (a panel per K, N against M, the dashed boundary; and MSE and latent MCC against L0
and L1, one line per encoder, the paper's Figure 6) are drawn from a runs folder by
``python -m saebench.tasks.synthetic_plots RUNS_DIR OUT_DIR``. No torch here: it reads records only.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Any

CS_CONSTANT = 1.0
"""C of the drawn bound M >= C K ln(N/K): saebench's choice (the paper's eq. (1) is not in its text)."""


def cs_min_measurements(n_sources: float, k_active: float, constant: float = CS_CONSTANT) -> float:
    """C K ln(N / K): the measurements compressed sensing asks for to recover K-sparse codes of N sources."""
    return constant * k_active * math.log(n_sources / k_active)


def cs_recoverable(n_sources: int, n_measurements: int, k_active: int, constant: float = CS_CONSTANT) -> bool:
    """Whether M >= C K ln(N / K)."""
    return n_measurements >= cs_min_measurements(n_sources, k_active, constant)


def _edges(values: list[float]) -> list[float]:
    """Cell edges around sorted values on a log axis (geometric midpoints, the ends mirrored)."""
    mids = [math.sqrt(a * b) for a, b in zip(values, values[1:])]
    if not mids:
        return [values[0] / math.sqrt(2), values[0] * math.sqrt(2)]
    return [values[0] ** 2 / mids[0], *mids, values[-1] ** 2 / mids[-1]]


def grid_figure(curves: list[tuple[str, list[dict[str, Any]]]], regime: str, path: Path) -> None:
    """Latent-MCC gap to the baseline encoder over (N, M), a panel per (encoder, K), with the CS boundary.

    Args:
        curves: (encoder label, its grid points from the details file) for each encoder but the baseline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = f"mcc_gap_{regime}"
    ks = sorted({p["k_active"] for _, pts in curves for p in pts})
    ns = sorted({p["n_sources"] for _, pts in curves for p in pts})
    ms = sorted({p["n_measurements"] for _, pts in curves for p in pts})
    values = [p[metric] for _, pts in curves for p in pts if p.get(metric) is not None]
    limit = max((abs(v) for v in values), default=1.0) or 1.0
    fig, axes = plt.subplots(len(curves), len(ks), figsize=(4.4 * len(ks) + 1.4, 3.4 * len(curves) + 0.8),
                             squeeze=False, layout="constrained")
    for row, (label, points) in enumerate(curves):
        for col, k in enumerate(ks):
            ax = axes[row][col]
            grid = np.full((len(ms), len(ns)), np.nan)
            for p in points:
                if p["k_active"] == k and p.get(metric) is not None:
                    grid[ms.index(p["n_measurements"]), ns.index(p["n_sources"])] = p[metric]
                    ax.text(p["n_sources"], p["n_measurements"], f"{p[metric]:+.2f}", ha="center", va="center",
                            fontsize=7, color="white" if abs(p[metric]) > 0.6 * limit else "black")
            image = ax.pcolormesh(_edges(ns), _edges(ms), grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
            _boundary(ax, k, _edges(ns))
            ax.set(xscale="log", yscale="log", title=f"{label}, K={k}",
                   xlabel="N (sources)" if row == len(curves) - 1 else None,
                   ylabel="M (measurements)" if col == 0 else None)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_yticks(ms, [str(m) for m in ms])
            ax.minorticks_off()
        fig.colorbar(image, ax=list(axes[row]), shrink=0.8, label="latent MCC gap")
    baseline = curves[0][1][0].get("baseline", "the first encoder") if curves and curves[0][1] else "baseline"
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"synthetic, {regime.replace('_', ' ')}: latent MCC minus {baseline}'s (mean over seeds)\n"
                 "compressed sensing predicts recovery above and left of the dashed line", fontsize=9)
    _save(fig, path)


def _boundary(ax, k: int, n_edges: list[float]) -> None:
    """The dashed line M = C K ln(N/K) across the panel (where it is positive)."""
    import numpy as np

    n = np.geomspace(max(n_edges[0], k * 1.01), n_edges[-1], 200)
    label = "M = K ln(N/K)" if CS_CONSTANT == 1 else f"M = {CS_CONSTANT:g} K ln(N/K)"
    ax.plot(n, [cs_min_measurements(v, k) for v in n], color="black", ls="--", lw=1.4,
            label=f"{label} (C = {CS_CONSTANT:g}, saebench's)")
    ax.set_xlim(n_edges[0], n_edges[-1])


def tradeoff_figure(curves: list[tuple[str, list[dict[str, Any]]]], regime: str, path: Path) -> None:
    """MSE and latent MCC against L0 and against L1, a line per encoder through its penalties (Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10.0, 7.4), squeeze=False, layout="constrained")
    for label, points in curves:
        points = sorted(points, key=lambda p: p["x"])
        for col, x in enumerate(("l0", "l1")):
            for row, y in enumerate(("mse", "latent_mcc")):
                axes[row][col].errorbar([p[x] for p in points], [p[y] for p in points],
                                        yerr=[p.get(f"{y}_se") or 0.0 for p in points], marker="o", ms=3,
                                        capsize=2, lw=1.2, label=label)
    for col, x in enumerate(("L0 (active latents per sample)", "L1 (sum of |code| per sample)")):
        for row, y in enumerate(("MSE (mean over measurements)", "latent MCC")):
            ax = axes[row][col]
            ax.set(xlabel=x, ylabel=y)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"synthetic, {regime.replace('_', ' ')}: sparsity trade-off, one point per l1 penalty "
                 "(mean ± s.e. over seeds)", fontsize=10)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(runs_dir: Path, out_dir: Path) -> list[Path]:
    """The grid and trade-off figures of every group of synthetic records under `runs_dir`; returns their paths."""
    from saebench.leaderboard import comparable_settings
    from saebench.plots import load_curves
    from saebench.records import config_hash, scan_record_files

    groups: dict[str, list] = {}
    for path, rec in scan_record_files(runs_dir)[0]:
        if rec.task["name"] == "synthetic":
            groups.setdefault(config_hash(comparable_settings(rec)), []).append((rec, load_curves(rec, path)))
    written = []
    for tag, group in sorted(groups.items()):
        params = group[0][0].config["task"]["params"]
        grid = [(rec.encoder["label"], c["grid"]) for rec, c in group if c.get("grid")]
        grid = [(label, pts) for label, pts in grid if label != pts[0].get("baseline")]
        for regime in params.get("regimes", "").split(",") if grid else []:
            if any(p.get(f"mcc_gap_{regime}") is not None for _, pts in grid for p in pts):
                written.append(Path(out_dir) / f"synthetic-{tag}-grid-{regime}.png")
                grid_figure(grid, regime, written[-1])
        tradeoff = [(rec.encoder["label"], c["tradeoff"]) for rec, c in group if c.get("tradeoff")]
        if tradeoff:
            written.append(Path(out_dir) / f"synthetic-{tag}-tradeoff.png")
            tradeoff_figure(tradeoff, params.get("tradeoff_regime", "unknown"), written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m saebench.tasks.synthetic_plots RUNS_DIR OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m saebench.tasks.synthetic_plots",
                                     description="Draw the synthetic task's grid (with the compressed-sensing "
                                                 "boundary) and sparsity trade-off figures from its records.")
    parser.add_argument("runs", type=Path, help="folder of records (saebench run --output)")
    parser.add_argument("out", type=Path, help="folder the PNG files are written to")
    args = parser.parse_args(argv)
    written = write_figures(args.runs, args.out)
    if not written:
        print(f"saebench: error: no synthetic records with a grid or a sparsity_sweep under {args.runs}",
              file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
