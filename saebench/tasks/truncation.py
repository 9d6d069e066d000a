"""``truncation_curve``: what the model keeps when each token keeps only part of its active latents.

EleutherAI's study of LLM-simulated SAE encoders found that keeping only each token's largest active
latents recovers the model's behaviour far faster than keeping a random subset of the same size: an
encoder that must predict latents should get the strong ones right first. For each fraction f, every
spliced token keeps ceil(f * L0) of its active latents, either its largest by activation ('top') or
a uniformly random subset ('random', seeded), is decoded by the encoder's own decoder and spliced in;
KL to the clean model and CE loss are measured as in ``ce_kl`` (non-sink positions whose target is
not BOS; standard errors clustered by context). f = 1 is the encoder itself.

The clean pass and the layers below the hookpoint run once per batch; each (fraction, mode) costs one
pass of the layers above it.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saebench.encoders.base import Codes, EncodeContext, Encoder, dense
from saebench.errors import SaebenchError
from saebench.splice import splice_activations
from saebench.stats import ratio_and_se, sum_by_row
from saebench.tasks.base import MetricSpec, Task, TaskContext, TaskResult, TaskSpec, checkpointed_batches
from saebench.tasks.losses import head_input, next_token_losses

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
MODES = ("top", "random")


@dataclass(frozen=True)
class TruncationConfig:
    """Parameters of truncation_curve."""

    tokens: int = 8192
    """Evaluation tokens (--limit overrides)."""
    context_len: int = 128
    """Tokens per context, BOS included (--context-len overrides)."""
    fractions: tuple[float, ...] = FRACTIONS
    """Shares of each token's active latents kept."""


def truncate(codes: Tensor, fraction: float, mode: str, gen: torch.Generator | None = None) -> Tensor:
    """(tokens, d_latent) codes keeping ceil(fraction * L0) active latents per token: the largest ('top'; ties
    by index) or a random subset ('random', drawn with `gen`)."""
    active = codes != 0
    keep_n = torch.ceil(fraction * active.sum(1).double()).long()
    if mode == "top":
        score = torch.where(active, codes.abs().float(), torch.full_like(codes, -1.0, dtype=torch.float32))
    else:
        noise = torch.rand(codes.shape, generator=gen).to(codes.device)
        score = torch.where(active, noise, torch.full_like(noise, -1.0))
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(codes.shape[1], device=codes.device).expand_as(order))
    return torch.where(active & (rank < keep_n[:, None]), codes, torch.zeros_like(codes))


class _Truncated(Encoder):
    """An encoder whose codes are truncated; decodes with the encoder's own decoder."""

    def __init__(self, inner: Encoder, fraction: float, mode: str, seed: int):
        self.inner, self.fraction, self.mode = inner, fraction, mode
        self.spec, self.capabilities = inner.spec, inner.capabilities
        self.gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_arg(cls, arg, build):  # built by the task only
        raise NotImplementedError

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return truncate(dense(self.inner.encode(acts, context)), self.fraction, self.mode, self.gen)

    def decode(self, codes: Codes) -> Tensor:
        return self.inner.decode(codes)


def _pct(f: float) -> str:
    return f"{round(100 * f)}pct" if f >= 0.01 else f"{100 * f:g}pct"


class TruncationCurveTask(Task):
    """KL and CE when each token keeps its top vs a random fraction of its active latents."""

    spec = TaskSpec(
        name="truncation_curve",
        version=1,
        headline="kl_top_10pct",
        metrics=(
            MetricSpec("kl_top_10pct", "lower", "KL(clean || spliced) keeping each token's largest 10% of its active latents"),
            MetricSpec("kl_random_10pct", "none", "the same keeping a random 10%"),
            MetricSpec("kl_top_50pct", "lower", "KL keeping the largest 50%"),
            MetricSpec("kl_random_50pct", "none", "KL keeping a random 50%"),
            MetricSpec("ce_top_10pct", "lower", "CE loss keeping the largest 10%"),
            MetricSpec("ce_random_10pct", "none", "CE loss keeping a random 10%"),
            MetricSpec("kl_full", "lower", "KL with every active latent (the encoder itself)"),
            MetricSpec("ce_clean", "none", "CE loss of the clean model"),
            MetricSpec("kl_ratio_auc", "higher", "area under KL vs log10(fraction), random over top (> 1: the top "
                                                 "latents recover the model faster)"),
        ),
        summary=("kl_top_10pct", "kl_random_10pct", "kl_top_50pct", "kl_random_50pct", "ce_top_10pct",
                 "ce_random_10pct", "kl_full", "ce_clean", "kl_ratio_auc"),
        stderr_method="clustered by context",
    )

    def __init__(self, tokens: int = TruncationConfig.tokens, context_len: int = TruncationConfig.context_len,
                 fractions: str | list | tuple = FRACTIONS):
        if isinstance(fractions, str):
            try:
                fractions = [float(x) for x in fractions.split(",") if x.strip()]
            except ValueError:
                raise SaebenchError(f"truncation_curve fractions {fractions!r}: give numbers, e.g. 0.1,0.5,1") from None
        fr = tuple(sorted(set(float(f) for f in fractions)))
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise SaebenchError(f"truncation_curve fractions {list(fractions)}: each must be in (0, 1]")
        if not {0.1, 0.5, 1.0} <= set(fr):
            fr = tuple(sorted(set(fr) | {0.1, 0.5, 1.0}))  # the headline metrics need them
        self.defaults = TruncationConfig(int(tokens), int(context_len), fr)

    def settings(self, ctx: TaskContext) -> TruncationConfig:
        return TruncationConfig(ctx.limit or self.defaults.tokens, ctx.context_len or self.defaults.context_len,
                                self.defaults.fractions)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        cfg = self.settings(ctx)
        return {"tokens": cfg.tokens, "context_len": cfg.context_len, "fractions": list(cfg.fractions),
                "corpus": ctx.corpus.name, "split": ctx.corpus.split}

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        for enc in encoders:
            if not enc.has_latents:
                raise SaebenchError(f"truncation_curve keeps part of each token's active latents; {enc.spec.label!r} "
                                    "has none (use an encoder with latents, e.g. sae:default)")
        cfg = self.settings(ctx)
        tokens = ctx.contexts(cfg.tokens, cfg.context_len)
        keys = [(e.spec.label, m, f) for e in encoders for m in MODES for f in cfg.fractions if m == "top" or f < 1]
        state = ctx.partial.load() or {"done": 0, "ce": [], "mask": [],
                                       **{str(k): {"kl": [], "ce": [], "l0": []} for k in keys}}
        head = ctx.forward.head
        for sl in checkpointed_batches(ctx, len(tokens), state, "truncation passes", 60.0):
            batch = tokens[sl]
            acts = ctx.capture(batch)
            keep = ctx.keep_mask(batch)
            clean = head_input(ctx.forward.resume(acts, batch, logits=False), head)
            passes, l0 = {}, {}
            for enc in encoders:
                for mode in MODES:
                    for f in cfg.fractions:
                        if mode == "random" and f == 1:
                            continue
                        key = str((enc.spec.label, mode, f))
                        kept = torch.zeros(batch.shape[0] * batch.shape[1], dtype=torch.float64)

                        def count(acts_, codes, recon, rows, kept=kept):
                            kept[rows.cpu()] = (codes != 0).sum(1).double().cpu()

                        seed = hash((ctx.seed, sl.start)) % 2**31
                        hidden = splice_activations(acts, batch, keep, _Truncated(enc, f, mode, seed), ctx.splice,
                                                    count, ctx.hookpoint.name)
                        passes[key] = head_input(ctx.forward.resume(hidden, batch, logits=False), head)
                        l0[key] = kept.view(batch.shape)
            ce_clean, dce, kl = next_token_losses(head, clean, passes, batch)
            mask = (~keep[:, :-1] & (batch[:, 1:] != ctx.model.bos_id)).double().cpu()
            state["ce"].append(sum_by_row(ce_clean, mask))
            state["mask"].append(mask.sum(1))
            for key in passes:
                state[key]["kl"].append(sum_by_row(kl[key], mask))
                state[key]["ce"].append(sum_by_row(ce_clean + dce[key], mask))
                act = (~keep).double().cpu()
                state[key]["l0"].append(torch.stack([sum_by_row(l0[key], act), act.sum(1)]))
        return {enc.spec.label: self._result(state, enc, cfg) for enc in encoders}

    def _result(self, state: dict, enc: Encoder, cfg: TruncationConfig) -> TaskResult:
        n = torch.cat(state["mask"])
        ce_clean, ce_clean_se = ratio_and_se(torch.cat(state["ce"]), n)
        rows, curve = [], {m: [] for m in MODES}
        for mode in MODES:
            for f in cfg.fractions:
                key = str((enc.spec.label, "top" if f == 1 else mode, f))
                kl, kl_se = ratio_and_se(torch.cat(state[key]["kl"]), n)
                ce, ce_se = ratio_and_se(torch.cat(state[key]["ce"]), n)
                l0s = torch.cat(state[key]["l0"], dim=1)
                rows.append({"curve": "fraction", "x": f, "mode": mode, "kl": kl, "kl_se": kl_se, "ce": ce,
                             "ce_se": ce_se, "l0_kept": float(l0s[0].sum() / l0s[1].sum())})
                curve[mode].append((f, kl, kl_se, ce, ce_se))
        at = {(m, f): (kl, kl_se, ce, ce_se) for m in MODES for f, kl, kl_se, ce, ce_se in curve[m]}
        metrics, stderr = {}, {}
        for name, (mode, f, i) in {"kl_top_10pct": ("top", 0.1, 0), "kl_random_10pct": ("random", 0.1, 0),
                                   "kl_top_50pct": ("top", 0.5, 0), "kl_random_50pct": ("random", 0.5, 0),
                                   "ce_top_10pct": ("top", 0.1, 2), "ce_random_10pct": ("random", 0.1, 2),
                                   "kl_full": ("top", 1.0, 0)}.items():
            metrics[name], stderr[name] = at[(mode, f)][i], at[(mode, f)][i + 1]
        metrics["ce_clean"], stderr["ce_clean"] = ce_clean, ce_clean_se
        x = np.log10([f for f, *_ in curve["top"]])
        areas = {m: _area(x, [c[1] for c in curve[m]]) for m in MODES}
        metrics["kl_ratio_auc"] = (float(areas["random"] / areas["top"]) if areas["top"] else None)
        stderr["kl_ratio_auc"] = None
        count = int(n.sum())
        curves = {"fraction": {"x": "fraction kept", "scale": "log10", "plot": "line", "series": "mode",
                               "metrics": ["kl", "ce", "l0_kept"]}}
        return TaskResult(metrics, stderr, {k: count for k in metrics}, rows, {"curves": curves})


def _area(x: np.ndarray, y: list[float | None]) -> float | None:
    """Trapezoid area under y(x); None when a value is missing or there is one point."""
    if len(x) < 2 or any(v is None for v in y):
        return None
    yy = np.asarray(y, dtype=float)
    return float(((yy[1:] + yy[:-1]) / 2 * np.diff(x)).sum())
