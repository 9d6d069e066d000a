"""Where along the context does an encoder break? Every metric as a function of token position.

SAEs trained on short contexts can degrade past them: Anders & Bloom ("Examining Language Model
Performance with Reconstructed Activations using Sparse Autoencoders", LessWrong, 2024) found the
gpt2-small res-jb SAEs, trained on 128-token contexts, reasonable up to position 128, after which ΔCE,
MSE and L0 explode, worst in early layers (~1-4). Averaged over positions, as ce_kl and sae-lens do,
that never shows.

Long sequences (--max-len tokens, BOS first) are taken from the corpus, the start of one
document each where documents are long enough (saebench.corpus.long_sequences). Every encoder
is spliced at every non-sink position of its hookpoint, and per position p (0-based; position 0
is BOS) the task measures:
- activation metrics at p: ||x||, MSE (||x - x_hat||^2 / d_in: the mean over dimensions), FVE
  (1 - sum ||x - x_hat||^2 / sum ||x - mean_p||^2, pooled over the sequences and positions of a
  range, mean_p the range's mean activation), L0, L1, cosine(x, x_hat);
- next-token metrics of the prediction made at p (of token p+1): ΔCE = CE(spliced) - CE(clean)
  and KL(clean || spliced), in nats.
Attention sinks (position 0 and any BOS inside a packed sequence) are passed through unspliced
and left out of every mean, as in ce_kl; predictions whose target is BOS are left out too.

Positions are aggregated into log2 buckets 1, 2-3, 4-7, ..., 512-1023, or, with buckets=single, taken
one at a time at positions 1, 2, 4, ..., 2^k and max_len-2. Those are the positions of Anders & Bloom's
figures (1, 2, 4, ..., 512, 1022 at a context of 1024, neither the first nor the last). Summary metrics
(standard errors clustered by sequence): mean ΔCE and L0 within the encoder's training context
(positions 1 .. T-1 for an encoder trained on T-token contexts, as its SAE metadata says) and
beyond it (positions T .. max_len-1), and `safe_context`:

    baseline = mean ΔCE over positions 1..63 (the buckets up to 32-63);
    a bucket is *broken* when its mean ΔCE >= 1.0 nats, or, for buckets from 64-127 on, when it
    exceeds 2 x max(baseline, 0.05 nats);
    safe_context = the end of the last bucket before the first broken one, in tokens (positions
    0 .. safe_context-1 are safe); max_len when no bucket is broken.

With buckets=single each bucket is one position: the baseline is the mean over positions 1, 2, 4, ...,
32, and safe_context is the first broken one of the positions looked at.

The 0.05-nat floor keeps a near-exact encoder (baseline ~0.01) from being called broken by noise.
Per-position and per-bucket curves go to the details file, not into the record's scalars.
Memory: only per-position sums are kept (saebench.stats.RangeMeans), never per-sequence values.
"""

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from saebench.corpus import long_sequences
from saebench.encoders.base import Codes, Encoder, latent_stats
from saebench.errors import SaebenchError
from saebench.forward import LMHead, capture_all
from saebench.splice import sink_mask, splice_activations
from saebench.stats import RangeMeans
from saebench.tasks.base import (
    MetricSpec,
    Task,
    TaskContext,
    TaskResult,
    TaskSpec,
    checked_length,
    checkpointed_batches,
    row_key,
)
from saebench.tasks.losses import head_input, next_token_losses
from saebench.tasks.params import added_at_default, choice

CHECKPOINT_SECONDS = 60.0
BASELINE_END = 64
"""Positions 1 .. BASELINE_END-1 give the baseline ΔCE that later buckets are compared with."""
BROKEN_FACTOR = 2.0
BROKEN_FLOOR = 0.05
"""Nats; the baseline is at least this when testing a bucket against BROKEN_FACTOR x baseline."""
BROKEN_ABSOLUTE = 1.0
"""Nats; a bucket at or above this mean ΔCE is broken whatever the baseline."""
ACT_METRICS = ("norm", "mse", "l0", "l1", "cos")
BUCKETINGS = ("log2", "single")
"""How positions are grouped for the bucket table and safe_context (module docstring)."""
PRED_METRICS = ("dce", "kl")


@dataclass(frozen=True)
class ContextSweepConfig:
    """Parameters of the context_sweep task."""

    max_len: int | None = None
    """Tokens per sequence, BOS included; None: min(1024, the model's context). --max-len overrides."""
    sequences: int = 32
    """Sequences evaluated; --limit overrides."""
    buckets: str = "log2"
    """'log2' (ranges 1, 2-3, 4-7, ...) or 'single' (positions 1, 2, 4, ..., 2^k and max_len-2 alone)."""


def bucket_spans(length: int, kind: str) -> list[tuple[int, int]]:
    """The (first, last) positions of each bucket of `kind` (BUCKETINGS) over positions 1 .. length-1."""
    if kind == "log2":
        return buckets(length)
    # single positions, as Anders & Bloom's figures: powers of two, then the last but one
    out, p = [], 1
    while p < length - 1:
        out.append(p)
        p *= 2
    if length - 2 >= 1 and length - 2 not in out:
        out.append(length - 2)
    return [(p, p) for p in out]


def buckets(length: int) -> list[tuple[int, int]]:
    """Log2 buckets (first, last position) covering positions 1 .. length-1: (1,1), (2,3), (4,7), ..."""
    out, lo = [], 1
    while lo < length:
        out.append((lo, min(2 * lo - 1, length - 1)))
        lo *= 2
    return out


def safe_context(bucket_dce: list[float | None], spans: list[tuple[int, int]], length: int) -> int:
    """The context (tokens) up to which no bucket is broken (definition in the module docstring)."""
    base_n = base_sum = 0.0
    for (lo, hi), value in zip(spans, bucket_dce):
        if hi < BASELINE_END and value is not None:
            base_sum, base_n = base_sum + value * (hi - lo + 1), base_n + (hi - lo + 1)
    baseline = max(base_sum / base_n if base_n else 0.0, BROKEN_FLOOR)
    for (lo, hi), value in zip(spans, bucket_dce):
        if value is None:
            continue
        if value >= BROKEN_ABSOLUTE or (lo >= BASELINE_END and value > BROKEN_FACTOR * baseline):
            return lo
    return length


class _Sums:
    """Per-position and per-range streaming means of one row's metrics."""

    def __init__(self, length: int, member: Tensor, d_in: int):
        self.d_in = d_in
        self.position = {k: RangeMeans(length) for k in (*ACT_METRICS, *PRED_METRICS, "sse")}
        self.ranges = {k: RangeMeans(length, member) for k in (*ACT_METRICS, *PRED_METRICS, "sse")}

    def add(self, name: str, values: Tensor, weights: Tensor) -> None:
        self.position[name].add(values, weights)
        self.ranges[name].add(values, weights)

    def merge(self, other: "_Sums") -> None:
        """Add a later batch's sums (saebench.tasks.context.merge_state)."""
        for name in self.position:
            self.position[name].merge(other.position[name])
            self.ranges[name].merge(other.ranges[name])


class _Clean:
    """Per-position sums of the clean activations at one hookpoint (for FVE's total variance)."""

    def __init__(self, length: int, d_in: int):
        self.sum_x = torch.zeros(length, d_in, dtype=torch.float64)
        self.sum_sq = torch.zeros(length, dtype=torch.float64)
        self.n = torch.zeros(length, dtype=torch.float64)

    def add(self, acts: Tensor, mask: Tensor) -> None:
        x = acts.double().cpu() * mask[..., None]
        self.sum_x += x.sum(0)
        self.sum_sq += (x**2).sum((0, 2))
        self.n += mask.double().sum(0)

    def merge(self, other: "_Clean") -> None:
        """Add a later batch's sums (saebench.tasks.context.merge_state)."""
        self.sum_x += other.sum_x
        self.sum_sq += other.sum_sq
        self.n += other.n

    def total_variance(self, member: Tensor | None) -> Tensor:
        """sum ||x - mean_r||^2 over each range r (each position when member is None)."""
        sx, sq, n = self.sum_x, self.sum_sq, self.n
        if member is not None:
            m = member.double()
            sx, sq, n = m.T @ sx, sq @ m, n @ m
        return sq - (sx**2).sum(1) / n.clamp_min(1)


class ContextSweepTask(Task):
    """Metrics per token position over long contexts, per encoder and layer; safe_context."""

    multi_hookpoint = True
    spec = TaskSpec(
        name="context_sweep",
        version=1,
        headline="safe_context",
        metrics=(
            MetricSpec("safe_context", "higher", "tokens of context before the first broken bucket of ΔCE (log2, or "
                                                 "single positions with buckets=single; saebench.tasks.context_sweep"
                                                 " docstring); max_len if none"),
            MetricSpec("dce_within", "lower", "mean ΔCE (spliced - clean CE, nats) at positions inside the "
                                              "encoder's training context"),
            MetricSpec("dce_beyond", "lower", "mean ΔCE (nats) at positions beyond the training context"),
            MetricSpec("dce", "lower", "mean ΔCE (nats) over all positions"),
            MetricSpec("kl", "lower", "mean KL(clean || spliced), nats, over all positions"),
            MetricSpec("l0_within", "none", "mean active latents per token inside the training context"),
            MetricSpec("l0_beyond", "none", "mean active latents per token beyond the training context"),
            MetricSpec("fve_within", "higher", "fraction of variance explained inside the training context"),
            MetricSpec("fve_beyond", "higher", "fraction of variance explained beyond the training context"),
            MetricSpec("training_context", "none", "tokens per context the encoder was trained on (its metadata)"),
            MetricSpec("max_len", "none", "tokens per evaluated sequence"),
        ),
        summary=("safe_context", "dce_within", "dce_beyond", "dce", "kl", "l0_within", "l0_beyond", "fve_within",
                 "fve_beyond", "training_context"),
        stderr_method="clustered by sequence (linearised ratio); safe_context and FVE have none",
        limit_unit="items",
    )

    def __init__(self, max_len: int | None = ContextSweepConfig.max_len,
                 sequences: int = ContextSweepConfig.sequences, buckets: str = ContextSweepConfig.buckets):
        if max_len is not None and int(max_len) < 2:  # before the model loads or another task writes a record
            raise SaebenchError(f"--max-len must be at least 2, not {max_len}")
        self.defaults = ContextSweepConfig(max_len, sequences, choice("context_sweep", "buckets", buckets, BUCKETINGS))

    def settings(self, ctx: TaskContext) -> ContextSweepConfig:
        """Preset defaults, then --max-len and --limit (sequences)."""
        given = self.defaults.max_len  # 0 is a bad --max-len, not "unset"
        max_len = checked_length(ctx.model, given if given is not None else min(1024, ctx.model.max_positions or 1024))
        return ContextSweepConfig(max_len, ctx.settings.limit or self.defaults.sequences, self.defaults.buckets)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return added_at_default(asdict(self.settings(ctx)), {"buckets": "log2"})

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        cfg = self.settings(ctx)
        length = cfg.max_len
        assert length is not None
        for enc in encoders:
            if enc.training_context and enc.training_context > length:
                raise SaebenchError(f"encoder {enc.spec.label!r} was trained on {enc.training_context}-token contexts, "
                                    f"longer than --max-len {length}: the sweep could not reach beyond its training "
                                    f"context; use --max-len {enc.training_context} or more")
        rows = [(row_key(e.spec.label, hp), e, hp) for hp, group in ctx.groups.items() for e in group
                if ctx.wanted is None or row_key(e.spec.label, hp) in ctx.wanted]
        hps = list(dict.fromkeys(hp for _, _, hp in rows))
        subs = {hp: ctx.at(hp) for hp in hps}
        for _, enc, hp in rows:
            enc.prepare(subs[hp].hook)
        seqs = long_sequences(ctx.model.tokenizer, ctx.settings.corpus, length, cfg.sequences, ctx.settings.seed, ctx.model.bos_id)
        print(f"saebench: context_sweep: {seqs.provenance()}", file=sys.stderr)
        if len(seqs.documents) < cfg.sequences:
            ctx.text.warn(f"the {ctx.settings.corpus.split} split of corpus {ctx.settings.corpus.name!r} gives {len(seqs.documents)} "
                     f"sequences of {length} tokens, fewer than the {cfg.sequences} asked for; evaluating all of them")
        spans = bucket_spans(length, cfg.buckets)
        member = self._member(length, spans, encoders)
        def fresh() -> dict:
            return {"sums": {key: _Sums(length, member[enc.training_context], ctx.model.d_model) for key, enc, _ in rows},
                    "clean": {hp: _Clean(length, ctx.model.d_model) for hp in hps}}

        state = ctx.store.load() or {"done": 0, **fresh()}
        head = LMHead.of(ctx.model.model, ctx.model.layers())
        tokens = seqs.tokens
        for sl, part in checkpointed_batches(ctx.settings, ctx.store, len(tokens), state,
                                             f"context_sweep ({len(rows)} encoder(s), {length} tokens)",
                                             CHECKPOINT_SECONDS, fresh):
            self._batch(ctx, subs, head, tokens[sl], rows, part)
        extra = {"sequences": seqs.provenance(), "documents_per_sequence": seqs.documents,
                 "sink_positions_inside": int((sink_mask(tokens, ctx.model.bos_id)[:, 1:]).sum())}
        return {key: self._result(state["sums"][key], state["clean"][hp], enc, spans, length, member, len(tokens),
                                  extra) for key, enc, hp in rows}

    @staticmethod
    def _member(length: int, spans: list[tuple[int, int]], encoders: list[Encoder]) -> dict[int | None, Tensor]:
        """Range membership per training context: the buckets, then all, within, beyond (positions 1..)."""
        out = {}
        for t in {e.training_context for e in encoders}:
            ranges = [*spans, (1, length - 1)]
            within = (1, min(t, length) - 1) if t else None
            beyond = (t, length - 1) if t and t < length else None
            m = torch.zeros(length, len(ranges) + 2)
            for j, span in enumerate([*ranges, within, beyond]):
                if span is not None and span[0] <= span[1]:
                    m[span[0]:span[1] + 1, j] = 1
            out[t] = m
        return out

    @torch.no_grad()
    def _batch(self, ctx: TaskContext, subs: dict[str, TaskContext], head: LMHead | None, batch: Tensor,
               rows: list[tuple[str, Encoder, str]], part: dict) -> None:
        """One batch: a clean pass capturing every hookpoint, then each encoder spliced from its hookpoint; the
        sums go to `part` (this batch's share of the run's state)."""
        hps = list(subs)
        clean, acts = capture_all([subs[hp].hook.forward for hp in hps], batch)
        clean_src = head_input(clean, head)
        del clean  # the (batch, seq, vocab) logits are not kept when the final norm's output is
        sinks = sink_mask(batch, ctx.model.bos_id)
        act_mask = (~sinks).double()
        pred_mask = (~sinks[:, :-1] & ~sinks[:, 1:]).double()  # (B, L-1): prediction at p of token p+1
        keep = ctx.keep_mask(batch)
        for hp, x in zip(hps, acts):
            part["clean"][hp].add(x, act_mask)
        outputs: dict[str, tuple[Tensor, bool] | None] = {}
        for key, enc, hp in rows:
            x = acts[hps.index(hp)]
            per_token = {k: torch.zeros(batch.numel(), dtype=torch.float64) for k in ("sse", "cos", "l0", "l1")}
            spliced = splice_activations(x, batch, keep, enc, ctx.settings.splice, self._on_chunk(per_token, enc), hp)
            sums: _Sums = part["sums"][key]
            norm = x.float().norm(dim=-1).double().cpu()
            sums.add("norm", norm, act_mask)
            for name in ("sse", "cos", "l0", "l1"):
                sums.add(name, per_token[name].view_as(act_mask), act_mask)
            sums.add("mse", per_token["sse"].view_as(act_mask) / x.shape[-1], act_mask)
            if torch.equal(spliced, x):  # exact: the spliced pass is the clean pass
                outputs[key] = None
                continue
            outputs[key] = head_input(subs[hp].hook.forward.resume(spliced, batch, logits=head is None), head)
        _, dce, kl = next_token_losses(head, clean_src, outputs, batch)
        for key, _, _ in rows:
            sums = part["sums"][key]
            sums.add("dce", _pad(dce[key]), _pad(pred_mask))
            sums.add("kl", _pad(kl[key]), _pad(pred_mask))

    @staticmethod
    def _on_chunk(per_token: dict[str, Tensor], enc: Encoder):
        def callback(acts: Tensor, codes: Codes, recon: Tensor, rows: Tensor) -> None:
            x, xh = acts.float(), recon.float()
            r = rows.cpu()
            per_token["sse"][r] = ((x - xh) ** 2).sum(1).double().cpu()
            per_token["cos"][r] = torch.cosine_similarity(x, xh, dim=1).double().cpu()
            if enc.has_latents and enc.spec.d_latent:
                l0, l1, _ = latent_stats(codes, enc.spec.d_latent)
                per_token["l0"][r], per_token["l1"][r] = l0.cpu(), l1.cpu()
            else:  # no latents: L0 and L1 are undefined, reported as missing
                per_token["l0"][r] = torch.nan
                per_token["l1"][r] = torch.nan

        return callback

    def _result(self, sums: _Sums, clean: _Clean, enc: Encoder, spans: list[tuple[int, int]], length: int,
                member: dict[int | None, Tensor], n_seq: int, extra: dict[str, Any]) -> TaskResult:
        m = member[enc.training_context]
        ranged = {k: r.mean_se() for k, r in sums.ranges.items()}
        fve_r = 1 - sums.ranges["sse"].sums[0] / clean.total_variance(m)
        n_b = len(spans)
        idx = {"all": n_b, "within": n_b + 1, "beyond": n_b + 2}

        def val(name: str, j: int) -> tuple[float | None, float | None]:
            mean, se = ranged[name]
            return _num(mean[j]), _num(se[j])

        def n_of(name: str, j: int) -> int:
            return int(sums.ranges[name].count()[j])

        bucket_dce = [val("dce", j)[0] for j in range(n_b)]
        t = enc.training_context
        metrics: dict[str, float | None] = {"safe_context": float(safe_context(bucket_dce, spans, length)),
                                            "training_context": float(t) if t else None, "max_len": float(length)}
        stderr: dict[str, float | None] = {"safe_context": None, "training_context": None, "max_len": None}
        n: dict[str, int | None] = {"safe_context": n_seq, "training_context": None, "max_len": None}
        for name, metric, where in (("dce_within", "dce", "within"), ("dce_beyond", "dce", "beyond"),
                                    ("dce", "dce", "all"), ("kl", "kl", "all"), ("l0_within", "l0", "within"),
                                    ("l0_beyond", "l0", "beyond")):
            metrics[name], stderr[name] = val(metric, idx[where])
            n[name] = n_of(metric, idx[where])
        for where in ("within", "beyond"):
            metrics[f"fve_{where}"] = _num(fve_r[idx[where]]) if n_of("sse", idx[where]) else None
            stderr[f"fve_{where}"], n[f"fve_{where}"] = None, n_of("sse", idx[where])
        details = self._curve_rows(sums, clean, spans, ranged, fve_r)
        curves = {"position": {"x": "position", "scale": "log2", "plot": "line", "overlay": "bucket",
                               "metrics": [*ACT_METRICS[:1], "mse", "fve", "l0", "l1", "cos", *PRED_METRICS]},
                  "bucket": {"x": "bucket", "plot": "table", "metrics": ["dce", "l0", "kl", "fve"]}}
        return TaskResult(metrics, stderr, n, details, extra | {"curves": curves, "training_context": t})

    @staticmethod
    def _curve_rows(sums: _Sums, clean: _Clean, spans, ranged, fve_r) -> list[dict[str, Any]]:
        rows = []
        pos = {k: r.mean_se() for k, r in sums.position.items()}
        fve_p = 1 - sums.position["sse"].sums[0] / clean.total_variance(None)
        length = len(fve_p)
        for p in range(length):
            row: dict[str, Any] = {"curve": "position", "x": p, "sink": p == 0,
                                   "n": int(sums.position["norm"].count()[p]),
                                   "n_pred": int(sums.position["dce"].count()[p])}
            for name in ("norm", "mse", "l0", "l1", "cos", "dce", "kl"):
                row[name], row[f"{name}_se"] = _num(pos[name][0][p]), _num(pos[name][1][p])
            row["fve"] = _num(fve_p[p]) if row["n"] > 1 else None
            rows.append(row)
        for j, (lo, hi) in enumerate(spans):
            row = {"curve": "bucket", "x": f"{lo}" if lo == hi else f"{lo}-{hi}", "first": lo, "last": hi,
                   "n": int(sums.ranges["norm"].count()[j]), "n_pred": int(sums.ranges["dce"].count()[j])}
            for name in ("norm", "mse", "l0", "l1", "cos", "dce", "kl"):
                row[name], row[f"{name}_se"] = _num(ranged[name][0][j]), _num(ranged[name][1][j])
            row["fve"] = _num(fve_r[j]) if row["n"] > 1 else None
            rows.append(row)
        return rows


def _pad(x: Tensor) -> Tensor:
    """(B, L-1) per-prediction values -> (B, L), the last position (no next token) unscored."""
    return torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _num(x: Tensor | float) -> float | None:
    value = float(x)
    return None if math.isnan(value) or math.isinf(value) else value

