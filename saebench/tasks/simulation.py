"""How well an LLM-simulated encoder (``llm_sim``) predicts its SAE's latents: ``latent_recall`` and
``value_correlation``.

Both score the same positions: one per context of the evaluation split, drawn uniformly among the
non-sink positions from `min_position` on, so that the simulator always reads some text. At each, the
encoder's candidates are every latent the SAE activates plus random inactive ones (see
saebench.encoders.llm_sim); metrics are computed per position ("prompt") over the candidates whose
simulator answer was read, then averaged, with standard errors std/sqrt(n) (positions are independent:
one per context) and inter-quartile ranges in extra.iqr. Candidates whose answer failed are left out and
counted (n_failed); with missing=skip, active latents without an explanation are never candidates, so
recall is over the explained ones, and extra.skipped_active (per position: skipped_active) counts the rest.

`latent_recall` also scales the error rates to the full dictionary (expected predicted-active latents
among all d_latent, the quantity that must stay near the true L0 for the prediction to be usable),
compares decoder directions (Hungarian-matched cosine, predicted vs true active sets, against a random
set of the same size), and measures the KL at each position when the predicted latents are patched in
there (median and IQR), beside the SAE's own reconstruction patched in the same way.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor

from saebench.encoders.base import EncodeContext, Encoder
from saebench.errors import SaebenchError
from saebench.tasks.base import (
    MetricSpec,
    PartialStore,
    Task,
    TaskContext,
    TaskResult,
    TaskSpec,
    checkpointed_batches,
)

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class ScoredConfig:
    """Where the simulated encoder is scored."""

    positions: int = 100
    """Scored positions, one per context (--limit overrides)."""
    context_len: int = 64
    """Tokens per context, BOS included (--context-len overrides)."""
    min_position: int = 8
    """First position that may be scored (the simulator reads up to 32 tokens before it)."""


@dataclass
class Scored:
    """The scored positions and their activations."""

    tokens: Tensor  # (n, context_len)
    positions: Tensor  # (n,)
    acts: Tensor  # (n, context_len, d_in) clean activations at the hookpoint

    def context(self) -> EncodeContext:
        rows = torch.arange(len(self.positions))
        return EncodeContext(self.tokens[rows, self.positions], self.positions, self.tokens, rows)

    def at_positions(self) -> Tensor:
        return self.acts[torch.arange(len(self.positions)), self.positions.to(self.acts.device)]


def scored_positions(ctx: TaskContext, cfg: ScoredConfig) -> Scored:
    """One non-sink position per context, drawn with the run's seed."""
    if cfg.context_len <= cfg.min_position:
        raise SaebenchError(f"context_len {cfg.context_len} leaves no position at or after min_position {cfg.min_position}")
    tokens = ctx.text.contexts(cfg.positions * cfg.context_len, cfg.context_len)
    keep = ~ctx.keep_mask(tokens)
    keep[:, :cfg.min_position] = False
    gen = torch.Generator().manual_seed(ctx.settings.seed)
    weights = keep.float() + 1e-12 * (keep.sum(1, keepdim=True) == 0)
    positions = torch.multinomial(weights, 1, generator=gen).squeeze(1)
    state = {"acts": []}
    for sl, part in _batches(ctx, len(tokens), state, f"activations {ctx.hook.name}", lambda: {"acts": []}):
        part["acts"].append(ctx.hook.capture(tokens[sl]).cpu())
    return Scored(tokens, positions, torch.cat(state["acts"]).to(ctx.model.device))


def _batches(ctx: TaskContext, n: int, state: dict, desc: str, fresh) -> Iterator[tuple[slice, dict]]:
    """Batches of the run's batch size over `n` rows, split over the ranks of a data-parallel run and merged in
    order into `state`; not checkpointed (the LLM's answers are in its response cache)."""
    return checkpointed_batches(ctx.settings, PartialStore(None), n, state, desc, math.inf, fresh)


def simulated(ctx: TaskContext, enc: Encoder, data: Scored, values: str | None) -> Any:
    """enc.simulate on every scored position, batch by batch (split over the ranks of a data-parallel run)."""
    x, context = data.at_positions(), data.context()
    state = {"sims": []}
    for sl, part in _batches(ctx, len(x), state, f"simulating {enc.spec.label}", lambda: {"sims": []}):
        part["sims"].append(enc.simulate(x[sl], context[sl], values=values))
    return type(state["sims"][0]).concat(state["sims"])


def _simulating(encoders: list[Encoder], task: str) -> None:
    for enc in encoders:
        if not hasattr(enc, "simulate"):
            raise SaebenchError(f"{task} scores encoders that predict latents from text (llm_sim:<sae spec>); "
                                f"{enc.spec.label!r} does not")


def _mean_se_iqr(values: list[float | None]) -> tuple[float | None, float | None, int, list[float] | None]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return None, None, 0, None
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return float(v.mean()), se, len(v), [float(np.percentile(v, 25)), float(np.percentile(v, 75))]


def classification(y: np.ndarray, pred: np.ndarray, p: np.ndarray, d_latent: int) -> dict[str, float | None]:
    """Scores of one position's candidates: y true active, pred predicted active, p P(active)."""
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    pos, neg = tp + fn, fp + tn
    recall = tp / pos if pos else None
    spec = tn / neg if neg else None
    out = {"recall": recall, "specificity": spec,
           "precision": tp / (tp + fp) if tp + fp else None,
           "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
           "balanced_accuracy": (recall + spec) / 2 if recall is not None and spec is not None else None,
           "auc": float(roc_auc_score(y, p)) if pos and neg else None}
    out["expected_active"] = (pos * recall + (d_latent - pos) * (1 - spec)) if recall is not None and spec is not None \
        else None
    return out


def matched_cosine(W: Tensor, a: Tensor, b: Tensor) -> float | None:
    """Decoder-direction agreement of latent sets a and b: the cosines of the Hungarian-matched pairs of their
    decoder rows, summed and divided by the larger set's size, so a latent left unmatched (a set predicted too
    large or too small) counts 0, as unmatched sources do in the synthetic task's MCC; None if both are empty."""
    if len(a) == 0 and len(b) == 0:
        return None
    if len(a) == 0 or len(b) == 0:
        return 0.0
    Wn = torch.nn.functional.normalize(W.float(), dim=1)
    cos = (Wn[a] @ Wn[b].T).cpu().numpy()
    r, c = linear_sum_assignment(cos, maximize=True)
    return float(cos[r, c].sum() / max(len(a), len(b)))


class LatentRecallTask(Task):
    """Active/inactive latent recall of an LLM-simulated encoder, its cost scaled to the dictionary, and its KL."""

    spec = TaskSpec(
        name="latent_recall",
        version=1,
        headline="balanced_accuracy",
        metrics=(
            MetricSpec("recall", "higher", "share of the truly active latents predicted active (mean over positions)"),
            MetricSpec("specificity", "higher", "share of the inactive candidates predicted inactive"),
            MetricSpec("precision", "higher", "share of predicted-active candidates truly active (positions that "
                                              "predict any)"),
            MetricSpec("f1", "higher", "F1 of the active class over the candidates"),
            MetricSpec("balanced_accuracy", "higher", "(recall + specificity) / 2"),
            MetricSpec("auc", "higher", "ROC AUC of P(active) over the candidates"),
            MetricSpec("expected_active", "lower", "predicted-active latents expected among the whole dictionary: "
                                                   "|A| recall + (d_latent - |A|)(1 - specificity)"),
            MetricSpec("true_l0", "none", "truly active latents per position"),
            MetricSpec("decoder_cosine", "higher", "Hungarian-matched decoder cosine, predicted vs true active set, "
                                                   "summed over pairs / the larger set's size (unmatched count 0)"),
            MetricSpec("decoder_cosine_random", "none", "the same for a random latent set of the predicted size"),
            MetricSpec("kl_median", "lower", "median KL(clean || predicted latents patched in, valued as the "
                                             "encoder's values option says) at the position"),
            MetricSpec("kl_sae_median", "lower", "median KL with the SAE's own reconstruction patched in"),
            MetricSpec("n_failed", "none", "candidates without a simulator answer (left out of every metric)"),
        ),
        summary=("balanced_accuracy", "recall", "specificity", "f1", "auc", "expected_active", "true_l0", "decoder_cosine",
                 "decoder_cosine_random", "kl_median", "kl_sae_median"),
        stderr_method="std/sqrt(positions); IQR in extra.iqr",
        limit_unit="items",
    )

    def __init__(self, positions: int = ScoredConfig.positions, context_len: int = ScoredConfig.context_len,
                 min_position: int = ScoredConfig.min_position):
        self.defaults = ScoredConfig(int(positions), int(context_len), int(min_position))

    def settings(self, ctx: TaskContext) -> ScoredConfig:
        return ScoredConfig(ctx.settings.limit or self.defaults.positions, ctx.settings.context_len or self.defaults.context_len,
                            self.defaults.min_position)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return asdict(self.settings(ctx)) | {"corpus": ctx.settings.corpus.name, "split": ctx.settings.corpus.split}

    @torch.no_grad()
    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        _simulating(encoders, self.spec.name)
        data = scored_positions(ctx, self.settings(ctx))
        clean_logp = self._logp(ctx, data, None)
        x = data.at_positions()
        inner_kl: dict[str, Tensor] = {}  # llm_sim encoders over one SAE share its reference pass
        for enc in encoders:
            if enc.inner.spec.label not in inner_kl:
                recon = enc.inner.decode(enc.inner.encode(x, data.context()))
                inner_kl[enc.inner.spec.label] = _kl(clean_logp, self._logp(ctx, data, recon))
        return {enc.spec.label: self._score(ctx, data, clean_logp, inner_kl[enc.inner.spec.label], enc)
                for enc in encoders}

    @torch.no_grad()
    def _logp(self, ctx: TaskContext, data: Scored, patch: Tensor | None) -> Tensor:
        """(n, vocab) log-probs at each scored position, with `patch` (n, d_in) put at that position only."""
        state = {"logp": []}
        for sl, part in _batches(ctx, len(data.positions), state, "log-probs", lambda: {"logp": []}):
            hidden = data.acts[sl].clone()
            if patch is not None:
                hidden[torch.arange(hidden.shape[0]), data.positions[sl].to(hidden.device)] = patch[sl].to(hidden)
            logits = ctx.hook.forward.resume(hidden, data.tokens[sl]).logits
            at = logits[torch.arange(logits.shape[0]), data.positions[sl].to(logits.device)]
            part["logp"].append(torch.log_softmax(at.float(), -1).cpu())
        return torch.cat(state["logp"])

    def _score(self, ctx: TaskContext, data: Scored, clean: Tensor, kl_sae: Tensor, enc: Encoder) -> TaskResult:
        sim = simulated(ctx, enc, data, enc.code_values)
        d = sim.d_latent
        per: list[dict[str, Any]] = []
        curve = {t: {"recall": [], "specificity": [], "expected_active": []} for t in THRESHOLDS}
        gen = torch.Generator().manual_seed(ctx.settings.seed)
        W = enc.W_dec.detach()
        for i in range(len(sim.candidates)):
            p = sim.p_active[i]
            ok = ~p.isnan()
            y = (sim.true[i] > 0)[ok].numpy()
            pred = enc.predicted(sim, i)[ok].numpy()
            pv = p[ok].numpy()
            row = classification(y, pred, pv, d)
            predicted_set = sim.candidates[i][ok][torch.from_numpy(pred)]
            true_set = sim.candidates[i][sim.true[i] > 0]
            rand = torch.randperm(d, generator=gen)[:len(predicted_set)]
            row |= {"position": int(data.positions[i]), "true_l0": int((sim.true[i] > 0).sum()) + sim.skipped_active[i],
                    "active": true_set.tolist(), "predicted": predicted_set.tolist(),
                    "skipped_active": sim.skipped_active[i],
                    "n_failed": int((~ok).sum()),
                    "decoder_cosine": matched_cosine(W, predicted_set, true_set),
                    "decoder_cosine_random": matched_cosine(W, rand, true_set)}
            per.append(row)
            for t in THRESHOLDS:
                c = classification(y, pv >= t, pv, d)
                for k in curve[t]:
                    curve[t][k].append(c[k])
        codes = enc.codes_of(sim)
        kl = _kl(clean, self._logp(ctx, data, enc.decode(codes)))
        for row, a, b in zip(per, kl.tolist(), kl_sae.tolist()):
            row["kl"], row["kl_sae"] = a, b
        metrics, stderr, n, iqr = {}, {}, {}, {}
        for m in ("recall", "specificity", "precision", "f1", "balanced_accuracy", "auc", "expected_active",
                  "true_l0", "decoder_cosine", "decoder_cosine_random"):
            metrics[m], stderr[m], n[m], iqr[m] = _mean_se_iqr([r[m] for r in per])
        for m, values in (("kl_median", kl), ("kl_sae_median", kl_sae)):
            v = values.numpy()
            metrics[m], stderr[m], n[m] = float(np.median(v)), None, len(v)
            iqr[m] = [float(np.percentile(v, 25)), float(np.percentile(v, 75))]
        metrics["n_failed"], stderr["n_failed"], n["n_failed"] = sum(r["n_failed"] for r in per), None, len(per)
        details = [{"curve": "threshold", "x": t} | {k: _mean_se_iqr(v)[0] for k, v in curve[t].items()}
                   for t in THRESHOLDS]
        details += [{"prompt": i} | r for i, r in enumerate(per)]
        curves = {"threshold": {"x": "threshold", "plot": "line",
                                "metrics": ["recall", "specificity", "expected_active"]}}
        extra = {"iqr": iqr, "curves": curves, "d_latent": d, "threshold": getattr(enc.cfg, "threshold", None),
                 "predict": getattr(enc.cfg, "predict", None), "candidates": getattr(enc.cfg, "candidates", None),
                 "simulator": enc.spec.params.get("simulator"), "explanations": enc.spec.params.get("explanations"),
                 "skipped_active": sum(sim.skipped_active)}
        return TaskResult(metrics, stderr, n, details, extra)


def _kl(clean: Tensor, patched: Tensor) -> Tensor:
    """(n,) KL(clean || patched) from log-probs."""
    return (clean.exp() * (clean - patched)).sum(-1).clamp(min=0)


class ValueCorrelationTask(LatentRecallTask):
    """How well the simulator's 0-9 value tracks the true activation of the truly active latents."""

    spec = TaskSpec(
        name="value_correlation",
        version=1,
        headline="pearson_bin",
        metrics=(
            MetricSpec("pearson_bin", "higher", "Pearson r, predicted value vs activation bin floor(10 a / max a)"),
            MetricSpec("spearman_bin", "higher", "Spearman rho, predicted value vs activation bin"),
            MetricSpec("pearson_quantile", "higher", "Pearson r, predicted value vs the activation's quantile among "
                                                     "the latent's activations on the training sample"),
            MetricSpec("spearman_quantile", "higher", "Spearman rho, predicted value vs activation quantile"),
            MetricSpec("mean_value", "none", "mean predicted value (0-9) of truly active latents"),
            MetricSpec("n_failed", "none", "truly active latents without a simulator answer (left out)"),
        ),
        summary=("pearson_bin", "spearman_bin", "pearson_quantile", "spearman_quantile", "mean_value", "n_failed"),
        stderr_method="bootstrap over positions (200 resamples)",
        limit_unit="items",
    )

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        _simulating(encoders, self.spec.name)
        data = scored_positions(ctx, self.settings(ctx))
        return {enc.spec.label: self._values(ctx, data, enc) for enc in encoders}

    def _values(self, ctx: TaskContext, data: Scored, enc: Encoder) -> TaskResult:
        sim = simulated(ctx, enc, data, "active")
        pairs, failed = [], 0  # (position, value, bin, quantile)
        for i in range(len(sim.candidates)):
            for j in (sim.true[i] > 0).nonzero().squeeze(1).tolist():
                v, latent, a = float(sim.value[i][j]), int(sim.candidates[i][j]), float(sim.true[i][j])
                if math.isnan(v):
                    failed += 1
                    continue
                pairs.append((i, v, enc.sample.bin_of(latent, a), enc.sample.quantile_of(latent, a)))
        arr = np.array(pairs, dtype=float).reshape(-1, 4)
        metrics, stderr, n = {}, {}, {}
        stats = {"pearson_bin": (pearsonr, 2), "spearman_bin": (spearmanr, 2),
                 "pearson_quantile": (pearsonr, 3), "spearman_quantile": (spearmanr, 3)}
        rng = np.random.default_rng(ctx.settings.seed)
        groups = [np.flatnonzero(arr[:, 0] == i) for i in range(len(sim.candidates))]
        boots = [np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))]) for _ in range(200)]
        for name, (fn, col) in stats.items():
            metrics[name] = _corr(fn, arr[:, 1], arr[:, col])
            vals = [c for b in boots if (c := _corr(fn, arr[b, 1], arr[b, col])) is not None]
            stderr[name] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
            n[name] = len(arr)
        metrics["mean_value"], stderr["mean_value"], n["mean_value"] = (
            float(arr[:, 1].mean()) if len(arr) else None, None, len(arr))
        metrics["n_failed"], stderr["n_failed"], n["n_failed"] = failed, None, len(arr) + failed
        details = [{"prompt": int(i), "value": v, "bin": int(b), "quantile": q} for i, v, b, q in pairs]
        extra = {"simulator": enc.spec.params.get("simulator"), "explanations": enc.spec.params.get("explanations")}
        return TaskResult(metrics, stderr, n, details, extra)


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(fn(a, b)[0])
