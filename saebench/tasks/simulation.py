"""How well an LLM-simulated encoder (``llm_sim``) predicts its SAE's latents: ``latent_recall`` and
``value_correlation``.

Both score the same positions, one per context of the evaluation split (see
saebench.tasks.simulation_scoring: a random non-sink position, or with ``position=last`` each context's last
token). At each, the encoder's candidates are every latent the SAE activates plus random inactive ones
(see saebench.encoders.llm_sim; the task parameter `candidates` overrides the encoder's count for the
run); metrics are computed per position ("prompt") over the candidates whose simulator answer was read,
then averaged, with standard errors std/sqrt(n) (positions are independent: one per context) and
inter-quartile ranges in extra.iqr. Candidates whose answer failed are left out and counted (n_failed);
with missing=skip, active latents without an explanation are never candidates, so recall is over the
explained ones, and extra.skipped_active (per position: skipped_active) counts the rest.

`latent_recall` also scales the error rates to the full dictionary (expected predicted-active latents
among all d_latent, the quantity that must stay near the true L0 for the prediction to be usable), draws
them against the P(active) threshold (EleutherAI's Figure 5), compares decoder directions
(Hungarian-matched cosine, predicted vs true active sets, against a random set of the same size), and
measures the KL at each position when the predicted latents are patched in there (median and IQR), beside
the SAE's own reconstruction patched in the same way.

`value_correlation` correlates the predicted 0-9 value of the truly active latents with their activation
bin and quantile, reading the value both ways EleutherAI's study does (its Table 2, Figure 4): the mean of the
digit distribution and its most likely digit (the mode).
"""

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor

from saebench.encoders.base import Encoder
from saebench.simulators import VALUE_PROMPTS
from saebench.tasks.base import MetricSpec, TaskContext, TaskResult, TaskSpec
from saebench.tasks.params import added_at_default, choice
from saebench.tasks.simulation_scoring import (
    ScoredConfig,
    Scored,
    SimulatedPositionsTask,
    batches,
    check_simulating,
    classification,
    matched_cosine,
    mean_se_iqr,
    scored_positions,
    simulated,
    threshold_curve,
)

__all__ = ["LatentRecallTask", "ValueCorrelationTask", "classification", "matched_cosine"]


class LatentRecallTask(SimulatedPositionsTask):
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

    @torch.no_grad()
    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        check_simulating(encoders, self.spec.name)
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
        for sl, part in batches(ctx, len(data.positions), state, "log-probs", lambda: {"logp": []}):
            hidden = data.acts[sl].clone()
            if patch is not None:
                hidden[torch.arange(hidden.shape[0]), data.positions[sl].to(hidden.device)] = patch[sl].to(hidden)
            logits = ctx.hook.forward.resume(hidden, data.tokens[sl]).logits
            at = logits[torch.arange(logits.shape[0]), data.positions[sl].to(logits.device)]
            part["logp"].append(torch.log_softmax(at.float(), -1).cpu())
        return torch.cat(state["logp"])

    def _score(self, ctx: TaskContext, data: Scored, clean: Tensor, kl_sae: Tensor, enc: Encoder) -> TaskResult:
        candidates = self.candidates_of(ctx, enc)
        sim = simulated(ctx, enc, data, enc.code_values, candidates)
        per, answers = _per_position(ctx, data, sim, enc)
        kl = _kl(clean, self._logp(ctx, data, enc.decode(enc.codes_of(sim))))
        for row, a, b in zip(per, kl.tolist(), kl_sae.tolist()):
            row["kl"], row["kl_sae"] = a, b
        metrics, stderr, n, iqr = {}, {}, {}, {}
        for m in ("recall", "specificity", "precision", "f1", "balanced_accuracy", "auc", "expected_active",
                  "true_l0", "decoder_cosine", "decoder_cosine_random"):
            metrics[m], stderr[m], n[m], iqr[m] = mean_se_iqr([r[m] for r in per])
        for m, values in (("kl_median", kl), ("kl_sae_median", kl_sae)):
            v = values.numpy()
            metrics[m], stderr[m], n[m] = float(np.median(v)), None, len(v)
            iqr[m] = [float(np.percentile(v, 25)), float(np.percentile(v, 75))]
        metrics["n_failed"], stderr["n_failed"], n["n_failed"] = sum(r["n_failed"] for r in per), None, len(per)
        details = threshold_curve(answers, sim.d_latent) + [{"prompt": i} | r for i, r in enumerate(per)] + \
            per_latent(sim, enc)
        curves = {"threshold": {"x": "threshold", "plot": "line",
                                "metrics": ["recall", "specificity", "expected_active"]}}
        extra = {"iqr": iqr, "curves": curves, "d_latent": sim.d_latent, "threshold": getattr(enc.cfg, "threshold", None),
                 "predict": getattr(enc.cfg, "predict", None), "candidates": candidates,
                 "simulator": enc.spec.params.get("simulator"), "explanations": enc.spec.params.get("explanations"),
                 "skipped_active": sum(sim.skipped_active)}
        return TaskResult(metrics, stderr, n, details, extra)


def _per_position(ctx: TaskContext, data: Scored, sim: Any, enc: Encoder) -> tuple[list[dict[str, Any]], list]:
    """Each position's scores and sets (details rows), and its answered candidates' (truly active, P(active))."""
    d, W = sim.d_latent, enc.W_dec.detach()
    gen = torch.Generator().manual_seed(ctx.settings.seed)
    per, answers = [], []
    for i in range(len(sim.candidates)):
        p = sim.p_active[i]
        ok = ~p.isnan()
        y, pred, pv = (sim.true[i] > 0)[ok].numpy(), enc.predicted(sim, i)[ok].numpy(), p[ok].numpy()
        predicted_set = sim.candidates[i][ok][torch.from_numpy(pred)]
        true_set = sim.candidates[i][sim.true[i] > 0]
        rand = torch.randperm(d, generator=gen)[:len(predicted_set)]
        per.append(classification(y, pred, pv, d) | {
            "position": int(data.positions[i]), "true_l0": int((sim.true[i] > 0).sum()) + sim.skipped_active[i],
            "active": true_set.tolist(), "predicted": predicted_set.tolist(), "skipped_active": sim.skipped_active[i],
            "n_failed": int((~ok).sum()), "decoder_cosine": matched_cosine(W, predicted_set, true_set),
            "decoder_cosine_random": matched_cosine(W, rand, true_set)})
        answers.append((y, pv))
    return per, answers


def per_latent(sim: Any, enc: Encoder) -> list[dict[str, Any]]:
    """One details row per latent ever a candidate: its recall over the positions where it was truly active and
    its specificity over those where it was an inactive candidate (answered candidates only); `saebench latents`
    joins them with the latent's explanation scores."""
    counts: dict[int, list[int]] = {}
    for i in range(len(sim.candidates)):
        ok = ~sim.p_active[i].isnan()
        pred = enc.predicted(sim, i)
        for latent, active, yes in zip(sim.candidates[i][ok].tolist(), (sim.true[i] > 0)[ok].tolist(), pred[ok].tolist()):
            c = counts.setdefault(latent, [0, 0, 0, 0])
            c[0 if active else 2] += int(yes == active)
            c[1 if active else 3] += 1
    return [{"kind": "latent", "latent": l, "recall": c[0] / c[1] if c[1] else None, "n_active": c[1],
             "specificity": c[2] / c[3] if c[3] else None, "n_inactive": c[3]} for l, c in sorted(counts.items())]


def _kl(clean: Tensor, patched: Tensor) -> Tensor:
    """(n,) KL(clean || patched) from log-probs."""
    return (clean.exp() * (clean - patched)).sum(-1).clamp(min=0)


CORRELATIONS = {"pearson_bin": (pearsonr, "mean", "bin"), "spearman_bin": (spearmanr, "mean", "bin"),
                "pearson_quantile": (pearsonr, "mean", "quantile"), "spearman_quantile": (spearmanr, "mean", "quantile"),
                "pearson_bin_mode": (pearsonr, "mode", "bin"), "pearson_quantile_mode": (pearsonr, "mode", "quantile")}
"""value_correlation's correlations: (function, predicted value read as, activation read as)."""
COLUMNS = ("prompt", "mean", "mode", "bin", "quantile")
"""Columns of value_correlation's (latent, position) pairs."""


class ValueCorrelationTask(SimulatedPositionsTask):
    """How well the simulator's 0-9 value tracks the true activation of the truly active latents."""

    spec = TaskSpec(
        name="value_correlation",
        version=1,
        headline="pearson_bin",
        metrics=(
            MetricSpec("pearson_bin", "higher", "Pearson r, predicted value (the mean of the 0-9 digit distribution) "
                                                "vs activation bin floor(10 a / max a)"),
            MetricSpec("spearman_bin", "higher", "Spearman rho, predicted value (mean) vs activation bin"),
            MetricSpec("pearson_quantile", "higher", "Pearson r, predicted value (mean) vs the activation's quantile "
                                                     "among the latent's activations on the training sample"),
            MetricSpec("spearman_quantile", "higher", "Spearman rho, predicted value (mean) vs activation quantile"),
            MetricSpec("pearson_bin_mode", "higher", "Pearson r, the most likely digit (the mode; ties: the lower) "
                                                     "vs activation bin"),
            MetricSpec("pearson_quantile_mode", "higher", "Pearson r, the most likely digit vs activation quantile"),
            MetricSpec("mean_value", "none", "mean predicted value (0-9, the mean) of truly active latents"),
            MetricSpec("n_failed", "none", "truly active latents without a simulator answer (left out)"),
        ),
        summary=("pearson_bin", "spearman_bin", "pearson_quantile", "spearman_quantile", "pearson_bin_mode",
                 "pearson_quantile_mode", "mean_value", "n_failed"),
        stderr_method="bootstrap over positions (200 resamples)",
        limit_unit="items",
    )

    def __init__(self, positions: int = ScoredConfig.positions, context_len: int = ScoredConfig.context_len,
                 min_position: int = ScoredConfig.min_position, position: str = ScoredConfig.position,
                 candidates: str | int | None = None, value_prompt: str = "default"):
        super().__init__(positions, context_len, min_position, position, candidates)
        self.value_prompt = choice(self.spec.name, "value_prompt", value_prompt, tuple(VALUE_PROMPTS))

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return super().config(ctx) | added_at_default({"value_prompt": self.value_prompt}, {"value_prompt": "default"})

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        check_simulating(encoders, self.spec.name)
        data = scored_positions(ctx, self.settings(ctx))
        return {enc.spec.label: self._values(ctx, data, enc) for enc in encoders}

    def _values(self, ctx: TaskContext, data: Scored, enc: Encoder) -> TaskResult:
        candidates = self.candidates_of(ctx, enc)
        sim = simulated(ctx, enc, data, "active", candidates, self.value_prompt)
        arr, failed = value_pairs(sim, enc.sample)
        col = {name: arr[:, k] for k, name in enumerate(COLUMNS)}
        metrics, stderr, n = {}, {}, {}
        rng = np.random.default_rng(ctx.settings.seed)
        groups = [np.flatnonzero(col["prompt"] == i) for i in range(len(sim.candidates))]
        boots = [np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))]) for _ in range(200)]
        for name, (fn, value, target) in CORRELATIONS.items():
            metrics[name] = _corr(fn, col[value], col[target])
            vals = [c for b in boots if (c := _corr(fn, col[value][b], col[target][b])) is not None]
            stderr[name] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
            n[name] = len(arr)
        metrics["mean_value"], stderr["mean_value"], n["mean_value"] = (
            float(col["mean"].mean()) if len(arr) else None, None, len(arr))
        metrics["n_failed"], stderr["n_failed"], n["n_failed"] = failed, None, len(arr) + failed
        details = value_curves(col) + [{"prompt": int(i), "value": v, "mode": int(m), "bin": int(b), "quantile": q}
                                       for i, v, m, b, q in arr.tolist()]
        curves = {"distribution": {"x": "value (0-9)", "plot": "line", "series": "of", "metrics": ["share"]},
                  "by_predicted": {"x": "predicted value (mode)", "plot": "line",
                                   "metrics": ["bin_mean", "quantile_mean", "n_latents"]}}
        extra = {"simulator": enc.spec.params.get("simulator"), "explanations": enc.spec.params.get("explanations"),
                 "candidates": candidates, "curves": curves}
        return TaskResult(metrics, stderr, n, details, extra)


def value_pairs(sim: Any, sample: Any) -> tuple[np.ndarray, int]:
    """(pairs, 5) rows of (position, mean value, mode value, activation bin, activation quantile), one per truly
    active latent with a value answer, and the number without one."""
    pairs, failed = [], 0
    for i in range(len(sim.candidates)):
        for j in (sim.true[i] > 0).nonzero().squeeze(1).tolist():
            v, latent, a = float(sim.value[i][j]), int(sim.candidates[i][j]), float(sim.true[i][j])
            if math.isnan(v):
                failed += 1
                continue
            mode = int(sim.value_probs[i][j].argmax())  # the first maximum: ties go to the lower digit
            pairs.append((i, v, mode, sample.bin_of(latent, a), sample.quantile_of(latent, a)))
    return np.array(pairs, dtype=float).reshape(-1, len(COLUMNS)), failed


def value_curves(col: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Details rows of EleutherAI's Figure 4. 'distribution' (left panel): the share of pairs at each value 0-9
    of the predicted mean (rounded), the predicted mode, the activation bin and the activation decile
    (floor(10 quantile)). 'by_predicted' (right panel): per predicted mode, the mean activation bin and
    quantile."""
    digits = np.arange(10)
    read = {"predicted_mean": np.floor(col["mean"] + 0.5), "predicted_mode": col["mode"], "activation_bin": col["bin"],
            "activation_decile": np.minimum(np.floor(10 * col["quantile"]), 9)}
    total = max(len(col["mean"]), 1)
    rows = [{"curve": "distribution", "x": int(k), "of": name, "share": float((values == k).sum() / total)}
            for name, values in read.items() for k in digits]
    for k in digits:
        at = col["mode"] == k
        if at.any():
            rows.append({"curve": "by_predicted", "x": int(k), "bin_mean": float(col["bin"][at].mean()),
                         "quantile_mean": float(col["quantile"][at].mean()), "n_latents": int(at.sum())})
    return rows


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(fn(a, b)[0])
