"""``truncation_curve``: what the model keeps when each token keeps only part of its active latents.

EleutherAI's study of LLM-simulated SAE encoders found that keeping only each token's largest active
latents recovers the model's behaviour "much faster" than keeping a random subset of the same size: an
encoder that must predict latents should get the strong ones right first. Every spliced token keeps
part of its active latents (saebench.tasks.truncation_rule), either its largest by |activation| ('top')
or a uniformly random subset ('random', seeded by the run's seed and the batch), is decoded by the
encoder's own decoder and spliced in; KL to the clean model and CE loss are measured as in ``ce_kl``
(predictions from non-sink positions whose target is not BOS; standard errors clustered by context).

The part is a fraction f of the token's L0, ceil(f * L0) latents (``keep=fraction``, the default; f = 1 is
the encoder itself), or, as that study's Figure 1 does ("using only a fixed number of active latents",
over "100 sequences of 64 tokens each"), a fixed count n, min(n, L0) latents (``keep=count``; counts 1, 2,
4, ... up to the dictionary, reported up to the first that covers the largest L0 seen). With keep=count the
fractions 0.1, 0.5 and 1 are still evaluated, for the metrics; the average L0 (the study's "average number
of active latents used in evaluation", its dashed line) is the metric ``l0``.

Work done: per batch, the layers below the hookpoint and the clean pass run once, each encoder
encodes once (the f = 1 pass records its codes, ranked; an LLM-simulated encoder asked again per
fraction would cost as much again and need not answer the same), and each (part, mode) costs
one pass of the layers above the hookpoint, except a count at or above the batch's largest L0, which
keeps everything: it is the f = 1 pass, whose sums it takes. The random order of a token's latents is
drawn once, so the random subsets are nested across parts, as the top ones are.
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
from saebench.tasks.params import added_at_default, choice, whole
from saebench.tasks.truncation_rule import FULL, Keep, keep_first, random_ranks, ranked_codes, truncate

__all__ = ["TruncationCurveTask", "truncate"]

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
MODES = ("top", "random")
NEEDED = (0.1, 0.5, 1.0)
"""Fractions the metrics read; always evaluated."""
KEEPS = ("fraction", "count")


@dataclass(frozen=True)
class TruncationConfig:
    """Parameters of truncation_curve."""

    tokens: int = 8192
    """Evaluation tokens (--limit overrides)."""
    context_len: int = 128
    """Tokens per context, BOS included (--context-len overrides)."""
    fractions: tuple[float, ...] = FRACTIONS
    """Shares of each token's active latents kept, each in (0, 1]; 0.1, 0.5 and 1 are always added."""
    keep: str = "fraction"
    """The curve's x: 'fraction' (of each token's L0) or 'count' (a fixed number of active latents)."""
    counts: tuple[int, ...] | None = None
    """keep=count: the counts; None: 1, 2, 4, ... up to each encoder's d_latent."""

    def counts_of(self, enc: Encoder) -> tuple[int, ...]:
        """The counts `enc` is truncated to (none with keep=fraction)."""
        if self.keep != "count":
            return ()
        if self.counts is not None:
            return self.counts
        d = enc.spec.d_latent
        return tuple(sorted({2 ** i for i in range(max(d, 1).bit_length()) if 2 ** i <= d} | {d}))


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

    def __init__(self, inner: Encoder, codes: _BatchCodes, seq_len: int, keep: Keep, mode: str):
        self.inner, self.codes, self.seq_len, self.keep, self.mode = inner, codes, seq_len, keep, mode
        self.spec, self.capabilities = inner.spec, inner.capabilities

    @classmethod
    def from_arg(cls, arg, build):  # built by the task only
        raise NotImplementedError

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        rows = (context.sequence * self.seq_len + context.positions).to(self.codes.values.device)
        ranks = self.codes.ranks[self.mode]
        out = keep_first(self.codes.indices[rows], self.codes.values[rows], None if ranks is None else ranks[rows],
                         self.keep, self.inner.spec.d_latent)
        return out if self.codes.sparse else dense(out)  # (chunk, d_latent): the splice's chunks are that small

    def decode(self, codes: Codes) -> Tensor:
        return self.inner.decode(codes)


class TruncationCurveTask(Task):
    """KL and CE when each token keeps its top vs a random part (a fraction or a fixed count) of its active
    latents."""

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
            MetricSpec("kl_ratio_auc", "higher", "area under KL vs log(part kept: the fraction, or with keep=count "
                                                 "the count), random over top (> 1: the top latents recover the "
                                                 "model faster)"),
            MetricSpec("l0", "none", "active latents per spliced token of the encoder (a count curve's reference)"),
        ),
        summary=("kl_top_10pct", "kl_random_10pct", "kl_top_50pct", "kl_random_50pct", "ce_top_10pct",
                 "ce_random_10pct", "kl_full", "ce_clean", "kl_ratio_auc", "l0"),
        stderr_method="clustered by context",
    )

    def __init__(self, tokens: int = TruncationConfig.tokens, context_len: int = TruncationConfig.context_len,
                 fractions: str | list | tuple | None = None, keep: str = "fraction", counts: str | list | tuple = "auto"):
        name = self.spec.name
        keep = choice(name, "keep", keep, KEEPS)
        if fractions is None:  # a count curve needs only the fractions its metrics read
            fractions = FRACTIONS if keep == "fraction" else NEEDED
        self.defaults = TruncationConfig(whole(name, "tokens", tokens, 1), whole(name, "context_len", context_len, 2),
                                         _fractions(fractions), keep, _counts(counts, keep))

    def settings(self, ctx: TaskContext) -> TruncationConfig:
        """Preset defaults overridden by the user's --limit / --context-len."""
        d = self.defaults
        return TruncationConfig(ctx.settings.limit or d.tokens, ctx.settings.context_len or d.context_len, d.fractions,
                                d.keep, d.counts)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        cfg = self.settings(ctx)
        counts = {} if cfg.keep != "count" else {"counts": "auto" if cfg.counts is None else list(cfg.counts)}
        return added_at_default({"tokens": cfg.tokens, "context_len": cfg.context_len, "fractions": list(cfg.fractions),
                                 "keep": cfg.keep, **counts, "corpus": ctx.settings.corpus.name,
                                 "split": ctx.settings.corpus.split}, {"keep": "fraction"})

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        for enc in encoders:
            if not enc.has_latents or not enc.spec.d_latent:
                raise SaebenchError(f"truncation_curve keeps part of each token's active latents; {enc.spec.label!r} "
                                    "has none (use an encoder with latents: sae, ito, sparse_coding, mlp, llm_sim; "
                                    "e.g. sae:default)")
        cfg = self.settings(ctx)
        tokens = ctx.text.contexts(cfg.tokens, cfg.context_len)

        def fresh() -> dict:
            return {"ce": [], "n_pred": [], "n_act": [], "l0_max": {e.spec.label: [] for e in encoders},
                    **{_key(e, m, k): {"kl": [], "ce": [], "l0": []} for e in encoders for m, k in _passes(cfg, e)}}

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
        unspliced = ctx.keep_mask(batch)
        sinks = sink_mask(batch, ctx.model.bos_id)
        act_mask = (~sinks).double()  # positions averaged for L0, as in ce_kl
        pred_mask = (~sinks[:, :-1] & ~sinks[:, 1:]).double()  # predictions scored, as in ce_kl
        clean = head_input(ctx.hook.forward.resume(acts, batch, logits=head is None), head)
        pending: dict[str, HeadInput] = {}
        same: list[tuple[str, str]] = []  # (pass, the f = 1 pass it equals)
        ce_clean = None
        for enc in encoders:
            codes = _BatchCodes(batch.numel())
            for mode, keep in _passes(cfg, enc):
                key = _key(enc, mode, keep)
                if keep.kind == "count" and keep.amount >= int(codes.l0.max()):  # keeps everything: the f = 1 pass
                    same.append((key, _key(enc, "top", FULL)))
                    state[key]["l0"].append(sum_by_row(keep.of(codes.l0).view(batch.shape), act_mask))
                    continue
                inner = enc if keep.everything else _Truncated(enc, codes, batch.shape[1], keep, mode)
                hidden = splice_activations(acts, batch, unspliced, inner, ctx.settings.splice,
                                            codes.record if keep.everything else None, hp)
                if keep.everything:
                    codes.finish(torch.Generator().manual_seed(ctx.settings.seed * 1_000_003 + start))
                    state["l0_max"][enc.spec.label].append(codes.l0.max().view(1))
                state[key]["l0"].append(sum_by_row(keep.of(codes.l0).view(batch.shape), act_mask))
                pending[key] = head_input(ctx.hook.forward.resume(hidden, batch, logits=head is None), head)
                if head is None:  # logits are vocabulary-sized: score them one pass at a time
                    ce_clean = _score(head, clean, pending, batch, pred_mask, state)
        if pending:  # final-norm outputs are small: scored together, the clean log-probabilities once
            ce_clean = _score(head, clean, pending, batch, pred_mask, state)
        for key, full in same:
            state[key]["kl"].append(state[full]["kl"][-1])
            state[key]["ce"].append(state[full]["ce"][-1])
        state["ce"].append(ce_clean)
        state["n_pred"].append(pred_mask.sum(1))
        state["n_act"].append(act_mask.sum(1))

    def _result(self, state: dict, enc: Encoder, cfg: TruncationConfig) -> TaskResult:
        """The metrics, and the curves as details rows (random keeping everything is the full pass)."""
        n_pred, n_act = torch.cat(state["n_pred"]), torch.cat(state["n_act"])
        at = {(mode, f): _point(state, enc, mode, Keep("fraction", f), n_pred, n_act)
              for mode in MODES for f in cfg.fractions}
        rows = [{"curve": "fraction", "x": f, "mode": mode, **at[mode, f]} for mode in MODES for f in cfg.fractions]
        picks = [("kl", "top", 0.1), ("kl", "random", 0.1), ("kl", "top", 0.5), ("kl", "random", 0.5),
                 ("ce", "top", 0.1), ("ce", "random", 0.1)]
        out = {f"{m}_{mode}_{_pct(f)}": (at[mode, f][m], at[mode, f][f"{m}_se"]) for m, mode, f in picks}
        out |= {"kl_full": (at["top", 1.0]["kl"], at["top", 1.0]["kl_se"]),
                "ce_clean": ratio_and_se(torch.cat(state["ce"]), n_pred),
                "l0": ratio_and_se(torch.cat(state[_key(enc, "top", FULL)]["l0"]), n_act)}
        curves = {"fraction": {"x": "fraction kept", "scale": "log10", "plot": "line", "series": "mode",
                               "metrics": ["kl", "ce", "l0_kept"]}}
        extra: dict[str, Any] = {"curves": curves}
        x, kl_of = cfg.fractions, {m: [at[m, f]["kl"] for f in cfg.fractions] for m in MODES}
        if cfg.keep == "count":
            counts = _shown_counts(cfg, enc, state)
            points = {(mode, n): _point(state, enc, mode, Keep("count", n), n_pred, n_act) for mode in MODES for n in counts}
            rows += [{"curve": "count", "x": n, "mode": mode, **points[mode, n]} for mode in MODES for n in counts]
            curves["count"] = {"x": "active latents kept", "scale": "log2", "plot": "line", "series": "mode",
                               "metrics": ["kl", "ce", "l0_kept"]}
            extra["counts"] = list(counts)
            x, kl_of = counts, {m: [points[m, n]["kl"] for n in counts] for m in MODES}
        areas = {m: _area(np.log10(x), kl_of[m]) for m in MODES}
        out["kl_ratio_auc"] = (areas["random"] / areas["top"] if areas["top"] and areas["random"] is not None
                               else None, None)
        count = int(n_pred.sum())
        return TaskResult({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                          {k: count if v[0] is not None else None for k, v in out.items()}, rows, extra)


def _point(state: dict, enc: Encoder, mode: str, keep: Keep, n_pred: Tensor, n_act: Tensor) -> dict[str, Any]:
    """KL, CE (each with its standard error) and latents kept per token of one pass."""
    sums = state[_key(enc, "top" if keep.everything else mode, keep)]
    kl, ce = ratio_and_se(torch.cat(sums["kl"]), n_pred), ratio_and_se(torch.cat(sums["ce"]), n_pred)
    return {"kl": kl[0], "kl_se": kl[1], "ce": ce[0], "ce_se": ce[1],
            "l0_kept": ratio_and_se(torch.cat(sums["l0"]), n_act)[0]}


def _shown_counts(cfg: TruncationConfig, enc: Encoder, state: dict) -> tuple[int, ...]:
    """The counts given, or the automatic ones up to the first that covers the largest L0 seen (the rest
    equal it: they keep every active latent)."""
    counts = cfg.counts_of(enc)
    if cfg.counts is not None:
        return counts
    top = int(torch.cat(state["l0_max"][enc.spec.label]).max())
    return tuple(n for n in counts if n < top) + tuple(n for n in counts if n >= top)[:1]


def _fractions(fractions: str | list | tuple) -> tuple[float, ...]:
    """The fractions parameter, checked, with the ones the metrics read (NEEDED) added."""
    items = fractions.split(",") if isinstance(fractions, str) else list(fractions)
    try:
        fr = sorted({float(f) for f in items if str(f).strip()})
    except (TypeError, ValueError):
        raise SaebenchError(f"truncation_curve fractions {fractions!r}: give numbers in (0, 1], "
                            "e.g. 0.1,0.5,1") from None
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise SaebenchError(f"truncation_curve fractions {fractions!r}: each must be in (0, 1], e.g. 0.1,0.5,1")
    return tuple(sorted(set(fr) | set(NEEDED)))


def _counts(counts: str | list | tuple, keep: str) -> tuple[int, ...] | None:
    """The counts parameter: 'auto' (None: powers of two, see TruncationConfig.counts_of) or whole numbers >= 1."""
    if str(counts) == "auto":
        return None
    if keep != "count":
        raise SaebenchError(f"truncation_curve counts={counts!r} applies to keep=count, not keep={keep}")
    items = counts.split(",") if isinstance(counts, str) else list(counts)
    got = {whole("truncation_curve", "counts", c, 1) for c in items if str(c).strip()}
    if not got:
        raise SaebenchError(f"truncation_curve counts={counts!r}: give whole numbers of at least 1, e.g. 1,2,4,8, "
                            "or auto")
    return tuple(sorted(got))


def _score(head, clean: HeadInput, pending: dict[str, HeadInput], batch: Tensor, pred_mask: Tensor,
           state: dict) -> Tensor:
    """Add each pending pass's per-context KL and CE sums to `state` and empty `pending`; the (B,) clean CE sums."""
    ce_clean, dce, kl = next_token_losses(head, clean, pending, batch)
    for key in pending:
        state[key]["kl"].append(sum_by_row(kl[key], pred_mask))
        state[key]["ce"].append(sum_by_row(ce_clean + dce[key], pred_mask))
    pending.clear()
    return sum_by_row(ce_clean, pred_mask)


def _passes(cfg: TruncationConfig, enc: Encoder) -> list[tuple[str, Keep]]:
    """(mode, part kept) of each pass of `enc`, the full one (f = 1, shared by both modes) first: it records the
    codes."""
    return ([("top", FULL)] + [(m, Keep("fraction", f)) for m in MODES for f in cfg.fractions if f < 1]
            + [(m, Keep("count", n)) for m in MODES for n in cfg.counts_of(enc)])


def _key(enc: Encoder, mode: str, keep: Keep) -> str:
    amount = repr(float(keep.amount)) if keep.kind == "fraction" else f"n{keep.amount}"
    return f"{enc.spec.label}|{mode}|{amount}"


def _pct(f: float) -> str:
    return f"{round(100 * f)}pct"


def _area(x: np.ndarray, y: list[float | None]) -> float | None:
    """Trapezoid area under y(x); None when a value is missing or there is one point."""
    if len(x) < 2 or any(v is None or math.isnan(v) for v in y):
        return None
    yy = np.asarray(y, dtype=float)
    return float(((yy[1:] + yy[:-1]) / 2 * np.diff(x)).sum())
