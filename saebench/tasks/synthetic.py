"""Synthetic ground truth: how well each encoder infers known sparse codes (no language model).

Reproduces the synthetic experiments of O'Neill, Gumran & Klindt (2024, "Compute Optimal Inference
and Provable Amortisation Gap in Sparse Autoencoders", section 3.2): X = S D + noise, with N sources,
M < N measurements and exactly K active sources per sample. The details the text leaves out follow
the authors' code (github.com/charlieoneill11/sparse-inference, generate_data in experiments/utils.py
at commit 7b3e9d4): the K active sources drawn uniformly, their values |N(0, 1)|, unit-norm
dictionary rows.

Every encoder of the run is built and fitted afresh for every seed and regime, through the same
encoder families as on a language model (``--encoder linear_sae --encoder mlp --encoder sparse_coding
--encoder ito``):
- ``known_codes``: the training set carries the true codes; encoders that learn regress them (by MSE,
  or by cosine similarity as the paper does: ``known_codes_loss``) and decode with the dictionary the
  codes imply (least squares);
- ``known_dict``: the true dictionary is given; encoders that learn a dictionary use it instead;
- ``unknown``: encoders learn codes and dictionary from X alone.
``ito`` runs ``ito_method`` unless its spec says (OMP at k = K by default; ``gradient`` is the paper's
SAE+ITO, see saebench.encoders.pursuit).

Metrics (on the held-out test samples), mean over seeds, standard error = std / sqrt(seeds) (the
details rows hold every seed, and extra.std the standard deviations):
- latent MCC: |Pearson| between true and inferred code columns, matched one-to-one by the Hungarian
  algorithm (scipy's linear_sum_assignment), averaged over the N true sources (an unmatched or dead
  latent counts 0);
- dictionary MCC: the same on dictionary atoms (|Pearson| across the M entries; the authors' code
  matches greedily, saebench by the Hungarian algorithm); 1 by construction in ``known_dict``;
- MSE (mean over measurements), L0 and L1 (per sample), FLOPs per sample of encode, FLOPs of training.
With a ``grid`` over (N, M, K), each cell is run too and the gap in latent MCC to the first
encoder given (put ``linear_sae`` first) is drawn as a heatmap per regime, each cell marked by whether
compressed sensing predicts recovery (saebench.tasks.synthetic_plots). With a ``sparsity_sweep``,
every encoder is refitted once per penalty (its ``l1`` option) and its (L0, L1, MSE, latent MCC)
recorded per penalty: the sparsity trade-off of the paper's Figure 6.
"""

import math
from dataclasses import asdict, dataclass, replace
from itertools import product
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm.auto import tqdm

from saebench.encoders.base import (
    DECODER_DICTIONARY,
    BuildContext,
    EncoderSpec,
    TensorTrainingSet,
    dense,
    parse_encoder_arg,
    unknown_text,
)
from saebench.encoders.pursuit import METHODS as ITO_METHODS
from saebench.encoders.specs import apply_options
from saebench.errors import SaebenchError
from saebench.tasks.base import MetricSpec, Row, Task, TaskContext, TaskResult, TaskSpec
from saebench.tasks.params import added_at_default
from saebench.tasks.synthetic_plots import CS_CONSTANT, cs_recoverable

REGIMES = ("known_codes", "known_dict", "unknown")
PER_REGIME = ("latent_mcc", "dict_mcc", "mse", "l0", "l1", "training_flops")
TRADEOFF = ("l0", "l1", "mse", "latent_mcc")
"""What the sparsity sweep records per (encoder, penalty)."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic task (``--task 'synthetic?n_sources=32&k_active=5'``)."""

    n_sources: int = 16
    """N: latent sources (the true dictionary's rows)."""
    n_measurements: int = 8
    """M: dimensions of X."""
    k_active: int = 3
    """K: active sources per sample."""
    train_samples: int = 1024
    """Samples encoders learn from."""
    test_samples: int = 1024
    """Held-out samples every metric is computed on."""
    seeds: int = 5
    """Repetitions (data, dictionary and initialisation), seeds --seed ... --seed + seeds - 1."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to X."""
    steps: int = 20000
    """Full-batch Adam steps of every encoder that trains, unless its spec says (20,000: num_step of the
    authors' experiments/known_Z.py and known_D.py at commit 02b2109)."""
    regimes: str = ",".join(REGIMES)
    """Comma-separated regimes to run."""
    grid: str = ""
    """Cells 'N,M,K;N,M,K;...' run besides the defaults for the MCC-gap heatmap ('' for none)."""
    known_codes_loss: str = "mse"
    """How encoders that learn regress the known codes: 'mse', or 'cosine' (the paper's, section 3.5)."""
    ito_method: str = "omp"
    """Method of the ito encoder unless its spec says: 'omp' (at k = K), 'mp', 'gp', or 'gradient' (the
    paper's SAE+ITO: gradient descent on the codes from the SAE's)."""
    ito_iters: int = 0
    """Gradient steps of ito with method=gradient unless its spec says; 0: the encoder's own default."""
    sparsity_sweep: str = ""
    """Penalties 'a,b,...' each encoder is refitted with (its l1 option and its inner encoder's), in
    tradeoff_regime, recording L0, L1, MSE and latent MCC per penalty ('' for none)."""
    tradeoff_regime: str = "unknown"
    """Regime of the sparsity sweep."""


def make_problem(cfg: SyntheticConfig, seed: int) -> dict[str, Tensor]:
    """A dictionary, training and test samples (X) and their true codes (S)."""
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(cfg.n_sources, cfg.n_measurements, generator=gen)
    D = D / D.norm(dim=1, keepdim=True)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        active = torch.rand(n, cfg.n_sources, generator=gen).argsort(1)[:, :cfg.k_active]  # K of N, uniformly
        S = torch.zeros(n, cfg.n_sources).scatter_(1, active, torch.randn(n, cfg.k_active, generator=gen).abs())
        return S, S @ D + cfg.noise * torch.randn(n, cfg.n_measurements, generator=gen)

    S_train, X_train = sample(cfg.train_samples)
    S_test, X_test = sample(cfg.test_samples)
    return {"D": D, "S_train": S_train, "X_train": X_train, "S_test": S_test, "X_test": X_test}


def matched_mcc(true: Tensor, est: Tensor) -> float:
    """Mean over true columns of |Pearson| with the Hungarian-matched estimated column (0 if unmatched).

    true: (n, N); est: (n, L). Columns that never vary correlate 0.
    """
    def standard(a: Tensor) -> np.ndarray:
        a = a.double().numpy()
        a = a - a.mean(0)
        norm = np.linalg.norm(a, axis=0)
        return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)

    corr = np.abs(standard(true).T @ standard(est))  # (N, L)
    rows, cols = linear_sum_assignment(corr, maximize=True)
    return float(corr[rows, cols].sum() / true.shape[1])


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """'16,8,3;32,8,3' -> [(16, 8, 3), (32, 8, 3)]."""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            n, m, k = (int(v) for v in part.split(","))
        except ValueError:
            raise SaebenchError(f"synthetic grid cell {part!r}: write N,M,K (e.g. grid=16,8,3;32,8,3)") from None
        cells.append((n, m, k))
    return cells


def parse_penalties(text: str) -> list[float]:
    """'0.001,0.01' -> [0.001, 0.01] (each distinct value once, in the order given)."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            raise SaebenchError(f"synthetic sparsity_sweep value {part!r}: write penalties as numbers, "
                                "e.g. sparsity_sweep=0.001,0.01,0.1") from None
        if not value >= 0 or math.isinf(value):
            raise SaebenchError(f"synthetic sparsity_sweep value {part!r}: penalties must be finite and non-negative")
        if value not in values:
            values.append(value)
    return values


def check(cfg: SyntheticConfig) -> None:
    """One clear error for a configuration that cannot be generated."""
    cells = [(cfg.n_sources, cfg.n_measurements, cfg.k_active), *parse_grid(cfg.grid)]
    for n, m, k in cells:
        if min(n, m, k) < 1:
            raise SaebenchError(f"synthetic: N, M and K must be at least 1 (got N={n}, M={m}, K={k})")
        if k > n:
            raise SaebenchError(f"synthetic: K={k} active sources cannot exceed N={n} sources; lower k_active "
                                "or raise n_sources")
    if cfg.train_samples < 2 or cfg.test_samples < 2 or cfg.seeds < 1 or cfg.steps < 1:
        raise SaebenchError("synthetic: train_samples and test_samples must be at least 2, seeds and steps at least 1")
    if cfg.noise < 0:
        raise SaebenchError(f"synthetic: noise must be non-negative, not {cfg.noise}")
    if bad := set(cfg.regimes.split(",")) - set(REGIMES):
        raise SaebenchError(f"synthetic: unknown regime(s) {', '.join(sorted(bad))}; use {', '.join(REGIMES)}")
    if cfg.tradeoff_regime not in REGIMES:
        raise SaebenchError(f"synthetic: tradeoff_regime={cfg.tradeoff_regime!r}; use one of {', '.join(REGIMES)}")
    if cfg.known_codes_loss not in ("mse", "cosine"):
        raise SaebenchError(f"synthetic: known_codes_loss={cfg.known_codes_loss!r}; use mse or cosine")
    if cfg.ito_method not in ITO_METHODS:
        raise SaebenchError(f"synthetic: ito_method={cfg.ito_method!r}; use one of {', '.join(ITO_METHODS)}")
    if cfg.ito_iters < 0:
        raise SaebenchError(f"synthetic: ito_iters must be non-negative (0: the ito encoder's default), not {cfg.ito_iters}")
    parse_penalties(cfg.sparsity_sweep)


class SyntheticTask(Task):
    """Latent and dictionary recovery on synthetic sparse data, per regime, with FLOPs."""

    needs_model = False
    spec = TaskSpec(
        name="synthetic",
        version=1,
        headline="latent_mcc_unknown",
        metrics=(
            *(MetricSpec(f"{m}_{r}", d, f"{text} ({r.replace('_', ' ')} regime)") for r in REGIMES
              for m, d, text in (
                  ("latent_mcc", "higher", "mean Hungarian-matched |Pearson| of true vs inferred codes"),
                  ("dict_mcc", "higher", "mean Hungarian-matched |Pearson| of true vs decoder atoms"),
                  ("mse", "lower", "test reconstruction MSE, mean over measurements"),
                  ("l0", "none", "mean active latents per test sample"),
                  ("l1", "none", "mean sum of |code| per test sample"),
                  ("training_flops", "lower", "FLOPs spent training the encoder (3 x forward x samples)"))),
            MetricSpec("encode_flops", "lower", "FLOPs per sample of encode (a multiply-add counts 2)"),
        ),
        summary=("latent_mcc_known_dict", "latent_mcc_unknown", "dict_mcc_unknown", "latent_mcc_known_codes",
                 "mse_unknown", "l0_unknown", "encode_flops", "training_flops_unknown"),
        stderr_method="std over seeds / sqrt(seeds)",
        limit_unit="samples",
    )

    def __init__(self, **params: Any):
        # preset values (YAML-typed) and ?options (text) alike, converted to each field's type
        self.cfg = apply_options(SyntheticConfig(), {k: str(v) for k, v in params.items()}, "synthetic")
        check(self.cfg)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        cfg = self._cfg(ctx)
        return added_at_default(asdict(cfg), {"known_codes_loss": "mse", "ito_method": "omp", "ito_iters": 0,
                                              "sparsity_sweep": "", "tradeoff_regime": "unknown"})

    def _cfg(self, ctx: TaskContext) -> SyntheticConfig:
        return replace(self.cfg, test_samples=ctx.settings.limit) if ctx.settings.limit else self.cfg

    def check_specs(self, specs: list[str]) -> None:
        for spec in specs:
            if "@" in spec:
                raise SaebenchError(f"synthetic has no hookpoints: drop '@...' from {spec!r}")

    def rows(self, ctx: TaskContext) -> list[Row]:
        cfg = self._cfg(ctx)
        out = []
        for spec in ctx.specs:
            row = _row_spec(spec, cfg)
            out.append(Row(row.label, row, None))
        if len({r.key for r in out}) < len(out):
            raise SaebenchError("an encoder is given twice; give each encoder once")
        return out

    def run(self, ctx: TaskContext, encoders: list) -> dict[str, TaskResult]:
        cfg = self._cfg(ctx)
        rows = self.rows(ctx)
        regimes = [r for r in REGIMES if r in cfg.regimes.split(",")]
        cells = [(cfg.n_sources, cfg.n_measurements, cfg.k_active)]
        cells += [c for c in parse_grid(cfg.grid) if c not in cells]
        jobs: list[tuple] = [(cell, regime, i, None) for cell, regime, i in product(cells, regimes, range(cfg.seeds))]
        jobs += [(cells[0], cfg.tradeoff_regime, i, penalty)
                 for penalty, i in product(parse_penalties(cfg.sparsity_sweep), range(cfg.seeds))]
        per: dict[tuple, dict[str, dict[str, float]]] = {}
        for cell, regime, i, penalty in tqdm(jobs, desc="synthetic", unit="fit set", disable=not ctx.settings.progress,
                                               delay=1):  # a spec refused at once leaves just its error line
            name = f"{cell[0]}-{cell[1]}-{cell[2]}-{regime}-{i}" + ("" if penalty is None else f"-l1={penalty!r}")
            done = ctx.store.load_piece(name)
            if done is None:
                n, m, k = cell
                done = self._one(replace(cfg, n_sources=n, n_measurements=m, k_active=k), regime,
                                 ctx.settings.seed + i, ctx.specs, penalty)
                ctx.store.save_piece(name, done)
            per[(cell, regime, i, penalty)] = done
        return {row.key: self._result(row.key, per, cells, regimes, cfg) for row in rows}

    def _one(self, cfg: SyntheticConfig, regime: str, seed: int, specs: tuple[str, ...],
             penalty: float | None = None) -> dict[str, dict]:
        """Every encoder fitted and scored on one problem (with `penalty` as every encoder's l1, if given)."""
        data = make_problem(cfg, seed)
        key = asdict(cfg) | {"regime": regime, "seed": seed} | ({} if penalty is None else {"l1": penalty})
        training = TensorTrainingSet(data["X_train"], key, data["S_train"] if regime == "known_codes" else None)
        build = BuildContext(None, None, None, seed, False, width=cfg.n_measurements, training=training,
                             dictionary=data["D"] if regime == "known_dict" else None, d_latent=cfg.n_sources,
                             fit_seed=seed, option_defaults=_option_defaults(cfg, penalty))
        out = {}
        for spec in specs:
            enc = build.build(spec)
            label = _row_spec(spec, cfg).label
            if enc.spec.d_in != cfg.n_measurements:
                raise SaebenchError(f"encoder {spec!r} reads {enc.spec.d_in}-dimensional activations, but the synthetic "
                                    f"data has M={cfg.n_measurements} measurements")
            enc.prepare(_TestMean(data["X_test"].mean(0)))  # the mean encoder's mean: over the test samples
            X = data["X_test"]
            with torch.no_grad():
                codes = dense(enc.encode(X, unknown_text(len(X))))
                recon = enc.decode(codes).float()
            codes = codes.float()
            out[label] = {
                "latent_mcc": matched_mcc(data["S_test"], codes),
                "dict_mcc": (matched_mcc(data["D"].T, enc.W_dec.float().T)
                             if DECODER_DICTIONARY in enc.capabilities else None),
                "mse": float(((recon - X) ** 2).mean()),
                "l0": float((codes != 0).sum(1).float().mean()),
                "l1": float(codes.abs().sum(1).mean()),
                "training_flops": enc.training_flops or 0.0,
                "encode_flops": enc.encode_flops,
            }
        return out

    def _result(self, key: str, per: dict, cells: list, regimes: list, cfg: SyntheticConfig) -> TaskResult:
        main = cells[0]
        names = [m.name for m in self.spec.metrics]  # a regime not run has null metrics, never absent ones
        metrics, stderr, n = dict.fromkeys(names), dict.fromkeys(names), dict.fromkeys(names)
        std: dict[str, float | None] = {}
        details: list[dict[str, Any]] = []
        for regime in regimes:
            runs = [per[(main, regime, i, None)][key] for i in range(cfg.seeds)]
            for i, run in enumerate(runs):
                details.append({"regime": regime, "seed_index": i, **run})
            for m in PER_REGIME:
                values = [r[m] for r in runs if r.get(m) is not None]
                name = f"{m}_{regime}"
                if not values:
                    metrics[name] = stderr[name] = n[name] = None
                    continue
                metrics[name], stderr[name] = _mean_se(values)
                std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else None
                n[name] = len(values)
        flops = [per[(main, r, 0, None)][key]["encode_flops"] for r in regimes]
        metrics["encode_flops"], stderr["encode_flops"], n["encode_flops"] = flops[0], None, 1
        extra: dict[str, Any] = {"std": std, "device": "cpu"}  # make_problem's tensors, and every fit on them
        curves: dict[str, Any] = {}
        if len(cells) > 1:
            details += self._gap_points(key, per, cells, regimes, cfg)
            first = next(iter(per[(cells[0], regimes[0], 0, None)]))
            curves["grid"] = {"x": "cell", "plot": "heatmap", "rows": "encoder",
                              "metrics": [f"mcc_gap_{r}" for r in regimes],
                              "note": f"latent MCC minus {first}'s, mean ± s.e. over seeds\n✓: M ≥ {CS_CONSTANT:g} K "
                                      "ln(N/K), compressed sensing predicts recovery"}
        if penalties := parse_penalties(cfg.sparsity_sweep):
            details += _tradeoff_points(key, per, main, penalties, cfg)
            curves["tradeoff"] = {"x": "l1 penalty", "plot": "table", "metrics": list(TRADEOFF)}
        if curves:
            extra["curves"] = curves
        return TaskResult(metrics, stderr, n, details=details, extra=extra)

    def _gap_points(self, key: str, per: dict, cells: list, regimes: list, cfg: SyntheticConfig) -> list[dict]:
        """Per grid cell, the latent MCC minus the first encoder's (mean over seeds, with its standard error), and
        whether compressed sensing predicts recovery there."""
        first = next(iter(per[(cells[0], regimes[0], 0, None)]))
        points = []
        for n, m, k in cells:
            recoverable = cs_recoverable(n, m, k)
            point: dict[str, Any] = {"curve": "grid", "x": f"N={n} M={m} K={k} {'✓' if recoverable else '✗'}",
                                     "baseline": first, "n_sources": n, "n_measurements": m, "k_active": k,
                                     "cs_recoverable": recoverable}
            for regime in regimes:
                runs = [per[((n, m, k), regime, i, None)] for i in range(cfg.seeds)]
                gap, se = _mean_se([r[key]["latent_mcc"] - r[first]["latent_mcc"] for r in runs])
                point[f"mcc_gap_{regime}"], point[f"mcc_gap_{regime}_se"] = gap, se
            points.append(point)
        return points


def _tradeoff_points(key: str, per: dict, cell: tuple, penalties: list[float], cfg: SyntheticConfig) -> list[dict]:
    """Per penalty of the sparsity sweep, L0, L1, MSE and latent MCC (mean over seeds, with standard errors)."""
    points = []
    for penalty in penalties:
        runs = [per[(cell, cfg.tradeoff_regime, i, penalty)][key] for i in range(cfg.seeds)]
        point: dict[str, Any] = {"curve": "tradeoff", "x": penalty, "regime": cfg.tradeoff_regime}
        for m in TRADEOFF:
            point[m], point[f"{m}_se"] = _mean_se([r[m] for r in runs])
        points.append(point)
    return points


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (std / sqrt(n); None for a single value)."""
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), se


def _option_defaults(cfg: SyntheticConfig, penalty: float | None) -> dict[str, dict[str, str]]:
    """Options the task gives the encoders it builds (a spec's own options win)."""
    every = {"steps": str(cfg.steps), "codes_loss": cfg.known_codes_loss}
    if penalty is not None:
        every["l1"] = repr(penalty)  # the SAE's, the MLP's, sparse coding's and gradient ITO's sparsity penalty
    ito = {"k": str(cfg.k_active), "method": cfg.ito_method} | ({"iters": str(cfg.ito_iters)} if cfg.ito_iters else {})
    return {"*": every, "ito": ito}


class _TestMean:
    """EvalData of synthetic samples: their mean, for the mean-ablation encoder."""

    def __init__(self, mean: Tensor):
        self.mean = mean

    def activation_mean(self) -> Tensor:
        return self.mean


def _row_spec(spec: str, cfg: SyntheticConfig) -> EncoderSpec:
    """The record's encoder: the spec as given (each seed fits its own instance)."""
    name, arg = parse_encoder_arg(spec)
    return EncoderSpec(name, arg, None, cfg.n_measurements, None, {"fitted_per_seed": True})
