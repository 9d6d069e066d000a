"""Does splicing an encoder at one layer make the encoders of later layers reconstruct worse?

A spliced reconstruction's error does not stay at its hookpoint: the layers above compute on
the reconstruction, so the activations a later encoder sees are off its training distribution.
Anders & Bloom ("Examining Language Model Performance with Reconstructed Activations using
Sparse Autoencoders", LessWrong, 2024) found that splicing a gpt2-small res-jb SAE at one layer
raises the reconstruction error of the later layers' SAEs. This task measures that for every
pair of the run's encoders.

Hookpoints are ordered by (layer, kind), kind in the order resid_pre < attn_out < mlp_out <
resid_post. For each source encoder i at hookpoint h_i and each encoder j at a hookpoint h_j
strictly later than h_i, on the same token contexts:
- clean: the model's activation x at h_j, encoded and decoded by j;
- spliced: i is spliced at h_i (every non-sink position, as splice_activations does; sinks too
  with --splice-bos), the model resumed from h_i, and the resulting activation x' at h_j encoded
  and decoded by j.
Three per-token quantities q are compared: MSE ||x - x_hat||^2 / d_in (the mean over
dimensions), L0 (active latents of j; only where j has latents) and ||x|| (the activation at h_j
itself, whatever j is). Each change is

    change_q = mean_spliced(q) / mean_clean(q) - 1,

the means taken over the same tokens: every position 1..N-1 (0-based; position 0 is BOS) of
every context, every attention sink (BOS inside a packed context) left out. Anders & Bloom's
notebook meant to average every position but averaged a single stale index; this task averages
all of them. The ratio is of per-context sums and its standard error the cluster-robust
linearised ratio variance over contexts (saebench.stats.ratio_and_se); subtracting 1 leaves it
unchanged. An exactly reconstructing source (the identity) changes nothing: 0 exactly.

Records: one per source encoder that has an encoder at a later hookpoint. Its scalar metrics
compare with the next later hookpoint (`_next`) and the last one (`_last`), at each the first
encoder in the run's order; every downstream encoder is a row of the details file, drawn as a
heatmap (sources x downstream encoders) by `saebench leaderboard`.
Memory: per-context sums only (a few floats per context and pair), never activations.
"""

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from saebench.encoders.base import Codes, Encoder, latent_stats
from saebench.errors import SaebenchError
from saebench.forward import capture_all
from saebench.models import forward_order
from saebench.splice import hook_at, reconstruct, sink_mask, splice_activations
from saebench.stats import ratio_and_se, sum_by_row
from saebench.tasks.base import (
    MetricSpec,
    Row,
    Task,
    TaskContext,
    TaskResult,
    TaskSpec,
    checked_length,
    checkpointed_batches,
    row_key,
)

CHECKPOINT_SECONDS = 60.0
QUANTITIES = ("mse", "l0", "norm")
WHERE = {"next": "the next later hookpoint", "last": "the last hookpoint"}
DESCRIPTIONS = {"mse": "MSE (||x - x_hat||^2 / d_in)", "l0": "L0 (active latents; encoders with latents only)",
                "norm": "activation norm ||x||"}


@dataclass(frozen=True)
class ErrorPropagationConfig:
    """Parameters of the error_propagation task."""

    max_len: int = 100
    """Tokens per context, BOS included; --max-len overrides."""
    sequences: int = 128
    """Contexts evaluated; --limit overrides."""


Target = tuple[str, Encoder, str]
"""(row key, encoder, hookpoint name) of an encoder."""


class ErrorPropagationTask(Task):
    """Change of later encoders' MSE, L0 and activation norm when an earlier encoder is spliced in."""

    multi_hookpoint = True
    spec = TaskSpec(
        name="error_propagation",
        version=1,
        headline="mse_change_next",
        metrics=tuple(
            MetricSpec(f"{q}_change_{where}", "lower" if q == "mse" else "none",
                       f"{DESCRIPTIONS[q]} of the first encoder at {text} with this encoder spliced in, "
                       "over it without: mean_spliced / mean_clean - 1")
            for where, text in WHERE.items() for q in QUANTITIES),
        summary=tuple(f"{q}_change_{where}" for where in WHERE for q in QUANTITIES),
        stderr_method="clustered by sequence (linearised ratio)",
        limit_unit="items",
    )

    def __init__(self, max_len: int = ErrorPropagationConfig.max_len,
                 sequences: int = ErrorPropagationConfig.sequences):
        self.defaults = ErrorPropagationConfig(max_len, sequences)

    def settings(self, ctx: TaskContext) -> ErrorPropagationConfig:
        """Preset defaults, then --max-len and --limit (sequences)."""
        return ErrorPropagationConfig(checked_length(ctx.model, self.defaults.max_len), ctx.settings.limit or self.defaults.sequences)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return asdict(self.settings(ctx))

    @staticmethod
    def _ordered(ctx: TaskContext) -> list[str]:
        """The run's hookpoints in forward-pass order."""
        return sorted((hp for hp, group in ctx.groups.items() if group), key=forward_order)

    def _downstream(self, ctx: TaskContext) -> dict[str, list[Target]]:
        """For each hookpoint, the encoders at strictly later hookpoints, in forward order (run order
        within a hookpoint)."""
        order = self._ordered(ctx)
        if len(order) < 2:
            raise SaebenchError("error_propagation needs encoders at two or more hookpoints, e.g. "
                                "--encoder 'sae:default@layers.{5,15,25}.resid_post'")
        return {hp: [(row_key(e.spec.label, later), e, later) for later in order[k + 1:] for e in ctx.groups[later]]
                for k, hp in enumerate(order)}

    def rows(self, ctx: TaskContext) -> list[Row]:
        """One record per source encoder with an encoder at a later hookpoint."""
        return [Row(row_key(e.spec.label, hp), e.spec, hp) for hp, later in self._downstream(ctx).items() if later
                for e in ctx.groups[hp]]

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        cfg = self.settings(ctx)
        downstream = self._downstream(ctx)
        sources = [(row_key(e.spec.label, hp), e, hp) for hp, later in downstream.items() if later
                   for e in ctx.groups[hp] if ctx.wanted is None or row_key(e.spec.label, hp) in ctx.wanted]
        targets = list({key: (key, e, hp) for _, _, src in sources for key, e, hp in downstream[src]}.values())
        hps = [hp for hp in downstream if any(h == hp for _, _, h in [*sources, *targets])]
        subs = {hp: ctx.at(hp) for hp in hps}
        for _, enc, hp in {key: (key, e, hp) for key, e, hp in [*sources, *targets]}.values():
            enc.prepare(subs[hp].hook)
        tokens = ctx.text.contexts(cfg.sequences * cfg.max_len, cfg.max_len)  # (n_seq, max_len)
        n_seq = len(tokens)

        def sums() -> dict[str, Tensor]:
            return {q: torch.zeros(n_seq, dtype=torch.float64) for q in QUANTITIES}

        # per-context sums over the scored tokens: of each target on clean activations, and of each
        # (source, target) pair on the activations the spliced source leads to
        def fresh() -> dict:
            return {"tokens": torch.zeros(n_seq, dtype=torch.float64),
                    "clean": {key: sums() for key, _, _ in targets},
                    "spliced": {src: {key: sums() for key, _, _ in downstream[hp]} for src, _, hp in sources}}

        state = ctx.store.load() or {"done": 0, **fresh()}
        desc = f"error_propagation ({len(sources)} source(s), {len(targets)} downstream)"
        for seqs, part in checkpointed_batches(ctx.settings, ctx.store, n_seq, state, desc, CHECKPOINT_SECONDS, fresh):
            self._batch(ctx, subs, tokens[seqs], seqs, sources, targets, downstream, part)
        return {src: self._result(state, state["spliced"][src], downstream[hp]) for src, _, hp in sources}

    @torch.no_grad()
    def _batch(self, ctx: TaskContext, subs: dict[str, TaskContext], batch: Tensor, seqs: slice,
               sources: list[Target], targets: list[Target], downstream: dict[str, list[Target]],
               part: dict) -> None:
        """One batch: a clean pass capturing every hookpoint, then each source spliced and the model resumed
        from its hookpoint, capturing the later ones. `seqs` indexes the batch's contexts: their sums are
        written there in `part` (zero elsewhere), so merging the parts puts each context's sums in its place."""
        hps = list(subs)
        _, acts = capture_all([subs[hp].hook.forward for hp in hps], batch)
        clean = dict(zip(hps, acts))
        scored = ~sink_mask(batch, ctx.model.bos_id)  # (B, L): positions 1.. that are not sinks
        keep = ctx.keep_mask(batch)
        part["tokens"][seqs] = scored.double().sum(1)
        clean_sums = {key: self._measure(enc, clean[hp], batch, scored, ctx.settings.splice.chunk_elements, hp)
                      for key, enc, hp in targets}
        for key, got in clean_sums.items():
            for q, value in got.items():
                part["clean"][key][q][seqs] = value
        for src, enc, hp in sources:
            x = clean[hp]
            spliced = splice_activations(x, batch, keep, enc, ctx.settings.splice, where=hp)
            later = downstream[hp]
            if torch.equal(spliced, x):  # exact: every later activation is the clean one
                got = {key: clean_sums[key] for key, _, _ in later}
            else:
                seen = self._resume_capturing(subs, hp, spliced, batch, {h for _, _, h in later})
                got = {key: self._measure(e, seen[h], batch, scored, ctx.settings.splice.chunk_elements, h)
                       for key, e, h in later}
            for key, values in got.items():
                for q, value in values.items():
                    part["spliced"][src][key][q][seqs] = value

    @staticmethod
    def _resume_capturing(subs: dict[str, TaskContext], source: str, spliced: Tensor, batch: Tensor,
                          later: set[str]) -> dict[str, Tensor]:
        """(batch, seq, d_model) activations at each of `later` when the model resumes from `spliced` at
        `source`."""
        fwd = subs[source].hook.forward
        # a first pass of this shape is a full clean one: run it before the hooks, so they see only
        # the resumed pass (each keeps the last value written anyway)
        fwd.ensure_shape(batch)
        seen: dict[str, Tensor] = {}

        def keeper(name: str):
            def keep(hidden: Tensor) -> None:
                seen[name] = hidden.detach()
            return keep

        with ExitStack() as stack:
            for name in later:
                stack.enter_context(hook_at(subs[name].hook.hookpoint, keeper(name)))
            fwd.resume(spliced, batch, logits=False)
        missing = later - set(seen)
        if missing:
            raise RuntimeError(f"resuming from {source} never reached {', '.join(sorted(missing))}")
        return seen

    @staticmethod
    def _measure(enc: Encoder, x: Tensor, batch: Tensor, scored: Tensor, chunk_elements: int,
                 where: str) -> dict[str, Tensor]:
        """(B,) per-context sums over the scored positions of MSE, L0 and ||x|| for `enc` on `x` (B, L, d)."""
        b, length, d = x.shape
        if d != enc.spec.d_in:
            raise SaebenchError(f"encoder {enc.spec.label!r} has d_in {enc.spec.d_in} but {where} has width {d}")
        flat = x.reshape(-1, d)
        idx = scored.to(x.device).reshape(-1).nonzero().squeeze(1)
        sse = torch.zeros(b * length, dtype=torch.float64)
        l0 = torch.zeros(b * length, dtype=torch.float64)
        latents = _has_l0(enc)

        def on_chunk(acts: Tensor, codes: Codes, recon: Tensor, at: Tensor) -> None:
            r = at.cpu()
            sse[r] = ((acts.float() - recon.float()) ** 2).sum(1).double().cpu()
            if latents:
                l0[r] = latent_stats(codes, enc.spec.d_latent)[0].cpu()

        ids = batch.to(x.device).reshape(-1)[idx]
        reconstruct(enc, flat[idx], ids, idx % length, chunk_elements, on_chunk, idx, batch.to(x.device))
        mask = scored.double().cpu()
        norm = x.float().norm(dim=-1).double().cpu()
        return {"mse": sum_by_row(sse.view(b, length) / d, mask), "l0": sum_by_row(l0.view(b, length), mask),
                "norm": sum_by_row(norm, mask)}

    @staticmethod
    def _result(state: dict, spliced: dict[str, dict[str, Tensor]], later: list[Target]) -> TaskResult:
        """One source's record: a details row per downstream encoder, scalars for the next and last."""
        n = int(state["tokens"].sum())
        details = []
        for key, enc, hp in later:
            row: dict[str, Any] = {"curve": "downstream", "x": f"{enc.spec.label} @ {hp}", "hookpoint": hp,
                                   "encoder": enc.spec.label}
            for q in QUANTITIES:
                a, c = spliced[key][q], state["clean"][key][q]
                if q == "l0" and not _has_l0(enc):
                    change = se = mean_a = mean_c = None
                else:
                    ratio, se = ratio_and_se(a, c)
                    change = None if ratio is None else ratio - 1
                    mean_a, mean_c = (a.sum().item() / n, c.sum().item() / n) if n else (None, None)
                row |= {f"{q}_change": change, f"{q}_change_se": se, f"{q}_clean": mean_c, f"{q}_spliced": mean_a}
            row["n"] = n
            details.append(row)
        # the first encoder at the next later hookpoint, and at the last hookpoint
        picks = {"next": 0, "last": next(k for k, (_, _, hp) in enumerate(later) if hp == later[-1][2])}
        metrics: dict[str, float | None] = {}
        stderr: dict[str, float | None] = {}
        counts: dict[str, int | None] = {}
        for where, k in picks.items():
            for q in QUANTITIES:
                name = f"{q}_change_{where}"
                metrics[name], stderr[name] = details[k][f"{q}_change"], details[k][f"{q}_change_se"]
                counts[name] = None if q == "l0" and not _has_l0(later[k][1]) else n
        curves = {"downstream": {"x": "downstream encoder", "plot": "heatmap",
                                 "metrics": ["mse_change", "l0_change", "norm_change"]}}
        return TaskResult(metrics, stderr, counts, details,
                          {"curves": curves, "next": later[picks["next"]][0], "last": later[picks["last"]][0]})


def _has_l0(enc: Encoder) -> bool:
    """Whether L0 is defined for `enc`: it has latents of a known width."""
    return enc.has_latents and bool(enc.spec.d_latent)
