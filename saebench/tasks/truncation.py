"""``truncation_curve``: what the model keeps when each token keeps only part of its active latents.

EleutherAI's study of LLM-simulated SAE encoders found that keeping only each token's largest active
latents recovers the model's behaviour far faster than keeping a random subset of the same size: an
encoder that must predict latents should get the strong ones right first. For each fraction f, every
spliced token keeps ceil(f * L0) of its active latents, either its largest by |activation| ('top') or
a uniformly random subset ('random', seeded by the run's seed and the batch), is decoded by the
encoder's own decoder and spliced in; KL to the clean model and CE loss are measured as in ``ce_kl``
(predictions from non-sink positions whose target is not BOS; standard errors clustered by context).
f = 1 is the encoder itself. An index a sparse code lists twice is one latent with the sum of its values.

Work done: per batch, the layers below the hookpoint and the clean pass run once, each encoder
encodes once (the f = 1 pass records its codes, ranked; an LLM-simulated encoder asked again per
fraction would cost as much again and need not answer the same), and each (fraction, mode) costs
one pass of the layers above the hookpoint. The random order of a token's latents is drawn once, so
the random subsets are nested across fractions, as the top ones are.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saebench.encoders.base import Codes, EncodeContext, Encoder, SparseCodes, dense
from saebench.errors import SaebenchError
from saebench.splice import sink_mask, splice_activations
from saebench.stats import ratio_and_se, sum_by_row
from saebench.tasks.base import MetricSpec, Task, TaskContext, TaskResult, TaskSpec, checkpointed_batches
from saebench.tasks.losses import HeadInput, head_input, next_token_losses

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
MODES = ("top", "random")
NEEDED = (0.1, 0.5, 1.0)
"""Fractions the metrics read; always evaluated."""


@dataclass(frozen=True)
class TruncationConfig:
    """Parameters of truncation_curve."""

    tokens: int = 8192
    """Evaluation tokens (--limit overrides)."""
    context_len: int = 128
    """Tokens per context, BOS included (--context-len overrides)."""
    fractions: tuple[float, ...] = FRACTIONS
    """Shares of each token's active latents kept, each in (0, 1]; 0.1, 0.5 and 1 are always added."""


def ranked_codes(codes: Codes) -> tuple[Tensor, Tensor]:
    """Each token's active latents, largest |value| first (ties: lower index first), zero-padded.

    Args:
        codes: one chunk of dense (tokens, d_latent) or sparse codes (made dense: a chunk is small).
    Returns:
        (tokens, L) int64 latent indices and their values, L the chunk's largest L0 (at least 1).
    """
    x = dense(codes)
    width = min(max(int((x != 0).sum(1).max()) if len(x) else 0, 1), x.shape[1])
    # topk finds every active latent (|v| > 0 beats the inactive zeros) but leaves ties unordered:
    # order by index, then stably by magnitude
    idx = x.abs().float().topk(width, dim=1).indices.sort(dim=1).values
    order = x.gather(1, idx).abs().float().argsort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    return idx, x.gather(1, idx)


def random_ranks(values: Tensor, gen: torch.Generator) -> Tensor:
    """(tokens, L) rank of each slot of ranked codes in a uniformly random order of each token's active
    slots (inactive slots last), drawn on the CPU with `gen`."""
    noise = torch.rand(values.shape, generator=gen, dtype=torch.float64)
    order = noise.masked_fill(values.cpu() == 0, 2.0).argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(values.shape[1]).expand_as(order))
    return ranks.to(values.device)


def kept_count(l0: Tensor, fraction: float) -> Tensor:
    """ceil(fraction * l0) per token; a product a rounding error above an integer (0.14 * 50 =
    7.000000000000001) counts as that integer."""
    return torch.ceil(fraction * l0.double() - 1e-9).long()


def keep_first(indices: Tensor, values: Tensor, ranks: Tensor | None, fraction: float, d_latent: int) -> SparseCodes:
    """Ranked codes keeping each token's first ceil(fraction * L0) active latents in the order `ranks`
    (None: the ranked order, i.e. the largest)."""
    ranks = torch.arange(values.shape[1], device=values.device).expand_as(values) if ranks is None else ranks
    n = kept_count((values != 0).sum(1), fraction)
    return SparseCodes(indices, torch.where(ranks < n[:, None].to(ranks.device), values, 0), d_latent)


def truncate(codes: Codes, fraction: float, mode: str, gen: torch.Generator | None = None) -> Codes:
    """`codes` keeping ceil(fraction * L0) active latents per token: the largest by |value| ('top'; ties:
    lower index) or a uniformly random subset ('random', drawn with `gen`); sparse codes stay sparse."""
    indices, values = ranked_codes(codes)
    ranks = None if mode == "top" else random_ranks(values, gen or torch.Generator().manual_seed(0))
    sparse = isinstance(codes, SparseCodes)
    out = keep_first(indices, values, ranks, fraction, codes.d_latent if sparse else codes.shape[1])
    return out if sparse else dense(out)


class _BatchCodes:
    """One encoder's ranked codes of a batch's spliced positions, recorded from its f = 1 pass."""

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.chunks: list[tuple[Tensor, Tensor, Tensor]] = []
        self.sparse = False
        """Whether the encoder gave sparse codes (its decode then gets sparse ones, else dense)."""

    def record(self, acts: Tensor, codes: Codes, recon: Tensor, rows: Tensor) -> None:
        """splice_activations callback: the chunk's codes, ranked."""
        self.sparse = isinstance(codes, SparseCodes)
        self.chunks.append((rows, *ranked_codes(codes)))

    def finish(self, gen: torch.Generator) -> None:
        """(batch * seq, L) indices, values, random ranks and L0 by flat position (0 where not spliced)."""
        width = max([idx.shape[1] for _, idx, _ in self.chunks], default=1)
        device, dtype = (self.chunks[0][2].device, self.chunks[0][2].dtype) if self.chunks else ("cpu", torch.float32)
        self.indices = torch.zeros(self.n_positions, width, dtype=torch.long, device=device)
        self.values = torch.zeros(self.n_positions, width, dtype=dtype, device=device)
        for rows, idx, val in self.chunks:
            self.indices[rows, :idx.shape[1]], self.values[rows, :val.shape[1]] = idx, val
        self.ranks = {"top": None, "random": random_ranks(self.values, gen)}
        self.l0 = (self.values != 0).sum(1).cpu()
        self.chunks = []


class _Truncated(Encoder):
    """The codes an encoder gave each position in its f = 1 pass, truncated; decoded by the encoder."""

    def __init__(self, inner: Encoder, codes: _BatchCodes, seq_len: int, fraction: float, mode: str):
        self.inner, self.codes, self.seq_len, self.fraction, self.mode = inner, codes, seq_len, fraction, mode
        self.spec, self.capabilities = inner.spec, inner.capabilities

    @classmethod
    def from_arg(cls, arg, build):  # built by the task only
        raise NotImplementedError

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        rows = (context.sequence * self.seq_len + context.positions).to(self.codes.values.device)
        ranks = self.codes.ranks[self.mode]
        out = keep_first(self.codes.indices[rows], self.codes.values[rows], None if ranks is None else ranks[rows],
                         self.fraction, self.inner.spec.d_latent)
        return out if self.codes.sparse else dense(out)  # (chunk, d_latent): the splice's chunks are that small

    def decode(self, codes: Codes) -> Tensor:
        return self.inner.decode(codes)


class TruncationCurveTask(Task):
    """KL and CE when each token keeps its top vs a random fraction of its active latents."""

    spec = TaskSpec(
        name="truncation_curve",
        version=1,
        headline="kl_top_10pct",
        metrics=(
            MetricSpec("kl_top_10pct", "lower",
                       "KL(clean || spliced) keeping each token's largest 10% of its active latents"),
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
        items = fractions.split(",") if isinstance(fractions, str) else list(fractions)
        try:
            fr = sorted({float(f) for f in items if str(f).strip()})
        except (TypeError, ValueError):
            raise SaebenchError(f"truncation_curve fractions {fractions!r}: give numbers in (0, 1], "
                                "e.g. 0.1,0.5,1") from None
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise SaebenchError(f"truncation_curve fractions {fractions!r}: each must be in (0, 1], e.g. 0.1,0.5,1")
        self.defaults = TruncationConfig(int(tokens), int(context_len), tuple(sorted(set(fr) | set(NEEDED))))

    def settings(self, ctx: TaskContext) -> TruncationConfig:
        """Preset defaults overridden by the user's --limit / --context-len."""
        return TruncationConfig(ctx.settings.limit or self.defaults.tokens, ctx.settings.context_len or self.defaults.context_len,
                                self.defaults.fractions)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        cfg = self.settings(ctx)
        return {"tokens": cfg.tokens, "context_len": cfg.context_len, "fractions": list(cfg.fractions),
                "corpus": ctx.settings.corpus.name, "split": ctx.settings.corpus.split}

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        for enc in encoders:
            if not enc.has_latents or not enc.spec.d_latent:
                raise SaebenchError(f"truncation_curve keeps part of each token's active latents; {enc.spec.label!r} "
                                    "has none (use an encoder with latents: sae, ito, sparse_coding, mlp, llm_sim; "
                                    "e.g. sae:default)")
        cfg = self.settings(ctx)
        tokens = ctx.text.contexts(cfg.tokens, cfg.context_len)
        def fresh() -> dict:
            return {"ce": [], "n_pred": [], "n_act": [],
                    **{_key(e, m, f): {"kl": [], "ce": [], "l0": []} for e in encoders for m, f in _passes(cfg)}}

        state = ctx.store.load()
        if state is None or state.keys() != {"done", *fresh()}:  # none, or saved by other code: start again
            state = {"done": 0, **fresh()}
        for enc in encoders:
            enc.prepare(ctx.hook)
        for sl, part in checkpointed_batches(ctx.settings, ctx.store, len(tokens), state,
                                             f"truncation_curve {ctx.hook.name}", 60.0, fresh):
            self._batch(ctx, tokens[sl], sl.start, encoders, cfg, part)
        return {enc.spec.label: self._result(state, enc, cfg) for enc in encoders}

    @torch.no_grad()
    def _batch(self, ctx: TaskContext, batch: Tensor, start: int, encoders: list[Encoder], cfg: TruncationConfig,
               state: dict) -> None:
        """One batch: the clean pass, then every encoder's passes, their per-context sums added to `state`."""
        head, hp = ctx.hook.forward.head, ctx.hook.name
        acts = ctx.hook.capture(batch)  # (B, T, d)
        keep = ctx.keep_mask(batch)
        sinks = sink_mask(batch, ctx.model.bos_id)
        act_mask = (~sinks).double()  # positions averaged for L0, as in ce_kl
        pred_mask = (~sinks[:, :-1] & ~sinks[:, 1:]).double()  # predictions scored, as in ce_kl
        clean = head_input(ctx.hook.forward.resume(acts, batch, logits=head is None), head)
        pending: dict[str, HeadInput] = {}
        ce_clean = None
        for enc in encoders:
            codes = _BatchCodes(batch.numel())
            for mode, f in _passes(cfg):
                inner = enc if f == 1 else _Truncated(enc, codes, batch.shape[1], f, mode)
                hidden = splice_activations(acts, batch, keep, inner, ctx.settings.splice, codes.record if f == 1 else None, hp)
                if f == 1:
                    codes.finish(torch.Generator().manual_seed(ctx.settings.seed * 1_000_003 + start))
                key = _key(enc, mode, f)
                state[key]["l0"].append(sum_by_row(kept_count(codes.l0, f).view(batch.shape), act_mask))
                pending[key] = head_input(ctx.hook.forward.resume(hidden, batch, logits=head is None), head)
                if head is None:  # logits are vocabulary-sized: score them one pass at a time
                    ce_clean = _score(head, clean, pending, batch, pred_mask, state)
        if pending:  # final-norm outputs are small: scored together, the clean log-probabilities once
            ce_clean = _score(head, clean, pending, batch, pred_mask, state)
        state["ce"].append(ce_clean)
        state["n_pred"].append(pred_mask.sum(1))
        state["n_act"].append(act_mask.sum(1))

    def _result(self, state: dict, enc: Encoder, cfg: TruncationConfig) -> TaskResult:
        """The metrics, and the curve as details rows (random at f = 1 is the full pass)."""
        n_pred, n_act = torch.cat(state["n_pred"]), torch.cat(state["n_act"])
        ce_clean = ratio_and_se(torch.cat(state["ce"]), n_pred)
        rows, at = [], {}
        for mode in MODES:
            for f in cfg.fractions:
                sums = state[_key(enc, "top" if f == 1 else mode, f)]
                kl, ce = ratio_and_se(torch.cat(sums["kl"]), n_pred), ratio_and_se(torch.cat(sums["ce"]), n_pred)
                at[mode, f] = {"kl": kl, "ce": ce}
                rows.append({"curve": "fraction", "x": f, "mode": mode, "kl": kl[0], "kl_se": kl[1], "ce": ce[0],
                             "ce_se": ce[1], "l0_kept": ratio_and_se(torch.cat(sums["l0"]), n_act)[0]})
        out = {f"{m}_{mode}_{_pct(f)}": at[mode, f][m] for m, mode, f in
               [("kl", "top", 0.1), ("kl", "random", 0.1), ("kl", "top", 0.5), ("kl", "random", 0.5),
                ("ce", "top", 0.1), ("ce", "random", 0.1)]}
        out |= {"kl_full": at["top", 1.0]["kl"], "ce_clean": ce_clean}
        x = np.log10(cfg.fractions)
        areas = {m: _area(x, [at[m, f]["kl"][0] for f in cfg.fractions]) for m in MODES}
        out["kl_ratio_auc"] = (areas["random"] / areas["top"] if areas["top"] and areas["random"] is not None
                               else None, None)
        count = int(n_pred.sum())
        curves = {"fraction": {"x": "fraction kept", "scale": "log10", "plot": "line", "series": "mode",
                               "metrics": ["kl", "ce", "l0_kept"]}}
        return TaskResult({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                          {k: count if v[0] is not None else None for k, v in out.items()}, rows, {"curves": curves})


def _score(head, clean: HeadInput, pending: dict[str, HeadInput], batch: Tensor, pred_mask: Tensor,
           state: dict) -> Tensor:
    """Add each pending pass's per-context KL and CE sums to `state` and empty `pending`; the (B,) clean CE sums."""
    ce_clean, dce, kl = next_token_losses(head, clean, pending, batch)
    for key in pending:
        state[key]["kl"].append(sum_by_row(kl[key], pred_mask))
        state[key]["ce"].append(sum_by_row(ce_clean + dce[key], pred_mask))
    pending.clear()
    return sum_by_row(ce_clean, pred_mask)


def _passes(cfg: TruncationConfig) -> list[tuple[str, float]]:
    """(mode, fraction) of each pass, the full one (f = 1, shared by both modes) first: it records the codes."""
    return [("top", 1.0)] + [(m, f) for m in MODES for f in cfg.fractions if f < 1]


def _key(enc: Encoder, mode: str, fraction: float) -> str:
    return f"{enc.spec.label}|{mode}|{fraction!r}"


def _pct(f: float) -> str:
    return f"{round(100 * f)}pct"


def _area(x: np.ndarray, y: list[float | None]) -> float | None:
    """Trapezoid area under y(x); None when a value is missing or there is one point."""
    if len(x) < 2 or any(v is None or math.isnan(v) for v in y):
        return None
    yy = np.asarray(y, dtype=float)
    return float(((yy[1:] + yy[:-1]) / 2 * np.diff(x)).sum())
