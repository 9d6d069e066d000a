"""ce_kl with one encoder at several hookpoints spliced at once: a full replacement of those layers.

`--task ce_kl --all-at-once` adds, beside the single-hookpoint rows, one row per encoder label
given at two or more hookpoints (e.g. ``sae:default@layers.{5,15,25}.resid_post``): every one of
its hookpoints is spliced in the same forward pass, each seeing the activations the splices
below it produced. Its reference passes are the same combination of ablations: every hookpoint
zero-ablated at once (ce_zero), and every hookpoint replaced by its own mean activation over the
evaluation tokens (ce_mean), so ce_loss_recovered keeps its meaning for the replaced layers as a
whole. Activation metrics (FVE, MSE, L0, ...) are per hookpoint and stay on the single rows.

The pass starts at the lowest hookpoint from its clean activations; the splices above it are
forward hooks on the resumed layers. The clean activations and the clean final-norm output come
from ce_kl's reference cache, which that hookpoint's single run has filled; without the cache
(--no-reference-cache) one clean pass per batch computes them.
"""

from contextlib import ExitStack

import torch
from torch import Tensor

from saebench.encoders.base import Encoder, EncoderSpec
from saebench.encoders.baselines import MeanEncoder, ZeroEncoder
from saebench.forward import LMHead, capture_all
from saebench.models import forward_order
from saebench.splice import Splice, sink_mask, splice_activations
from saebench.stats import ratio_and_se, sum_by_row
from saebench.tasks.base import PartialStore, Row, TaskContext, TaskResult, checkpointed_batches
from saebench.tasks.losses import head_input, next_token_losses

CHECKPOINT_SECONDS = 60.0
PASSES = ("spliced", "zero", "mean")


def hookpoint_pattern(hookpoints: list[str]) -> str:
    """'layers.{5,15,25}.resid_post' for one kind, else the names joined by '+', in forward order."""
    ordered = sorted(hookpoints, key=forward_order)
    kinds = {h.split(".")[2] for h in ordered}
    if len(kinds) == 1:
        layers = ",".join(h.split(".")[1] for h in ordered)
        return f"layers.{{{layers}}}.{kinds.pop()}"
    return "+".join(ordered)


def joint_parts(ctx: TaskContext) -> dict[str, list[tuple[str, Encoder]]]:
    """Encoder label -> its (hookpoint, encoder) in forward order, for labels at two or more hookpoints."""
    by_label: dict[str, list[tuple[str, Encoder]]] = {}
    for hp, group in ctx.groups.items():
        for enc in group:
            by_label.setdefault(enc.spec.label, []).append((hp, enc))
    return {label: sorted(parts, key=lambda p: forward_order(p[0])) for label, parts in by_label.items()
            if len(parts) >= 2}


def joint_row(label: str, parts: list[tuple[str, Encoder]]) -> Row:
    """The record of `label` spliced at all its hookpoints at once; its spec lists the parts."""
    pattern = hookpoint_pattern([hp for hp, _ in parts])
    spec = EncoderSpec("joint", label, pattern, parts[0][1].spec.d_in, None,
                       {"parts": [enc.spec.to_dict() | {"hookpoint": hp} for hp, enc in parts]})
    return Row(f"joint:{label}@{pattern}", spec, pattern)


@torch.no_grad()
def run_joint(ctx: TaskContext, tokens: Tensor, parts: list[tuple[str, Encoder]], means: dict[str, Tensor],
              store: PartialStore, clean: tuple[Tensor, Tensor] | None = None) -> TaskResult:
    """CE and KL of `parts` spliced together, with the joint zero and mean ablations as references.

    Args:
        clean: (contexts, seq, d_model) clean activations at the lowest hookpoint and the clean final
            norm's output for `tokens` (ce_kl's reference cache); None runs a clean pass per batch.
    """
    subs = {hp: ctx.at(hp) for hp, _ in parts}
    d = ctx.model.d_model
    ablations = {"zero": [ZeroEncoder(d, hp) for hp, _ in parts], "mean": []}
    for hp, _ in parts:
        mean = MeanEncoder(d, hp)
        mean.mean = means[hp]
        ablations["mean"].append(mean)
    passes = {"spliced": [enc for _, enc in parts], **ablations}
    head = LMHead.of(ctx.model.model, ctx.model.layers())
    def fresh() -> dict:
        return {"sums": {k: [] for k in ("ce_clean", "n_pred", *[f"ce_{p}" for p in PASSES], *[f"kl_{p}" for p in PASSES])}}

    state = store.load() or {"done": 0, **fresh()}
    label = parts[0][1].spec.label
    desc = f"ce_kl {label} at {hookpoint_pattern(list(subs))} at once"
    for sl, part in checkpointed_batches(ctx.settings, store, len(tokens), state, desc, CHECKPOINT_SECONDS, fresh):
        cached = None if clean is None or head is None else (clean[0][sl], clean[1][sl])
        _batch(ctx, subs, head, tokens[sl], passes, part["sums"], cached)
    sums = {k: torch.cat(v) for k, v in state["sums"].items()}
    c, s, z, m, n = sums["ce_clean"], sums["ce_spliced"], sums["ce_zero"], sums["ce_mean"], sums["n_pred"]
    out = {"ce_clean": ratio_and_se(c, n), "ce_spliced": ratio_and_se(s, n), "ce_zero": ratio_and_se(z, n),
           "ce_mean": ratio_and_se(m, n), "ce_loss_recovered": ratio_and_se(z - s, z - c),
           "ce_loss_recovered_mean_abl": ratio_and_se(m - s, m - c), "kl": ratio_and_se(sums["kl_spliced"], n)}
    n_total = int(n.sum().item())
    return TaskResult({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
                      {k: n_total for k in out}, extra={"contexts": int(len(n)), "hookpoints": list(subs)})


def _batch(ctx: TaskContext, subs: dict[str, TaskContext], head: LMHead | None, batch: Tensor,
           passes: dict[str, list[Encoder]], sums: dict[str, list[Tensor]],
           cached: tuple[Tensor, Tensor] | None) -> None:
    """One batch: the clean pass (from `cached` (activations at the lowest hookpoint, final norm's output)
    where given), then each pass from the lowest hookpoint with the splices above it as hooks."""
    hps = list(subs)
    low = subs[hps[0]].hook.forward
    if cached is not None:
        act0, clean_src = cached[0].to(ctx.model.device), (cached[1].to(ctx.model.device), True)
    else:
        clean, (act0,) = capture_all([low], batch)
        clean_src = head_input(clean, head)
        del clean
    keep = ctx.keep_mask(batch)
    low.ensure_shape(batch)  # before the splice hooks go in: the shape's recording pass must stay clean
    outputs = {}
    for name, encoders in passes.items():
        first = splice_activations(act0, batch, keep, encoders[0], ctx.settings.splice, None, hps[0])
        with ExitStack() as stack:
            for hp, enc in zip(hps[1:], encoders[1:]):
                splice = Splice(subs[hp].hook.hookpoint, enc, ctx.settings.splice)
                splice.set_batch(batch.to(act0.device), keep)
                stack.enter_context(splice.installed())
            outputs[name] = head_input(low.resume(first, batch, logits=head is None), head)
    ce_clean, dce, kl = next_token_losses(head, clean_src, outputs, batch)
    sinks = sink_mask(batch, ctx.model.bos_id)
    pred_mask = ~sinks[:, :-1] & ~sinks[:, 1:]
    sums["ce_clean"].append(sum_by_row(ce_clean, pred_mask))
    sums["n_pred"].append(pred_mask.double().sum(1))
    for name in passes:
        sums[f"ce_{name}"].append(sum_by_row(ce_clean + dce[name], pred_mask))
        sums[f"kl_{name}"].append(sum_by_row(kl[name], pred_mask))
