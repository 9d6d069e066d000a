"""Forward passes split at a hookpoint: run the layers below it once, resume above it many times.

Every spliced pass sees the same activations below the hookpoint as the clean pass, so
re-running those layers per encoder is wasted work. `HookpointForward` runs the prefix once
(`capture`), then `resume` runs only the decoder layers above the hookpoint, the final norm
and the LM head from any replacement activation.

How the suffix is run: a decoder layer's inputs besides the residual stream (attention mask,
rotary position embeddings, position ids, ...) depend only on the input's shape for the
unpadded, cache-free passes saebench makes. The first pass of each (batch, seq) shape is a
full clean pass that records each layer's own arguments (Gemma-2 gives alternate layers
different masks) and checks that the suffix reproduces the full pass's logits; later passes of
that shape reuse the arguments. Where the suffix cannot be run (an architecture without a known
final norm and head) or does not reproduce the full pass, a one-line notice is printed and
`resume` runs the full model with the hookpoint replaced instead: slower, same numbers.

Hookpoints inside a layer (attn_out, mlp_out) resume at that layer's input: the layer runs in
full with its attention or MLP output replaced, then the layers above it. The layer's clean
input comes from the last capture of the same tokens, else from one prefix pass per batch
(shared by every encoder resumed on that batch).
"""

import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saebench.models import Hookpoint, LoadedModel
from saebench.splice import StopForward, check_finite, hook_at, module_input

# Final norm of each architecture family, keyed by where its layers live (models.LAYER_PATHS).
# The output embedding is the model's own get_output_embeddings(); Gemma-2 also soft-caps its
# logits (config.final_logit_softcapping).
FINAL_NORM_PATHS = {
    "model.layers": "model.norm",  # Llama, Mistral, Qwen, Gemma, Gemma-2
    "transformer.h": "transformer.ln_f",  # GPT-2
    "gpt_neox.layers": "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
}


def _attr(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


@dataclass(frozen=True)
class LMHead:
    """Final norm, output embedding and optional logit soft-cap: residual stream -> logits."""

    norm: nn.Module
    unembed: nn.Module
    softcap: float | None = None

    def logits(self, normed: Tensor) -> Tensor:
        """(batch, seq, vocab) logits from the final norm's output."""
        out = self.unembed(normed)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @classmethod
    def of(cls, model: nn.Module, layers: nn.ModuleList) -> "LMHead | None":
        """The head of a HF causal LM of a known family, or None."""
        for layer_path, norm_path in FINAL_NORM_PATHS.items():
            if _attr(model, layer_path) is layers:
                norm, unembed = _attr(model, norm_path), model.get_output_embeddings()
                if isinstance(norm, nn.Module) and isinstance(unembed, nn.Module):
                    return cls(norm, unembed, getattr(model.config, "final_logit_softcapping", None))
        return None


@dataclass
class ForwardOutput:
    """Logits of a pass, and the final norm's output they came from (None on the full-pass path)."""

    logits: Tensor | None  # (batch, seq, vocab); None when the caller asked for the norm's output only
    normed: Tensor | None  # (batch, seq, d_model)


class HookpointForward:
    """Clean captures at a hookpoint, and passes resumed from a replaced activation there.

    Args:
        model: the subject model.
        hookpoint: a hookpoint of it (residual stream, or attn_out / mlp_out inside a layer).
        reuse_prefix: run only the layers above the hookpoint when resuming (False: always the
            full model, with the hookpoint's activation replaced).
        notice: where one-line notices go (default: stderr).
    """

    def __init__(self, model: LoadedModel, hookpoint: Hookpoint, reuse_prefix: bool = True,
                 notice: Callable[[str], None] | None = None):
        self.model, self.hookpoint = model, hookpoint
        self.layers = model.layers()
        # resid_post of layer L is the input of layer L+1 (or of the final norm after the last layer);
        # resid_pre, attn_out and mlp_out of layer L resume at layer L's input
        self.start = hookpoint.layer + (1 if hookpoint.kind == "resid_post" else 0)
        self._layer_input: tuple[Tensor, Tensor] | None = None
        """(token ids, clean input of layer `start`) of the last batch seen, for inside-layer hookpoints."""
        self._notice = notice or (lambda msg: print(f"saebench: {msg}", file=sys.stderr, flush=True))
        self.head = LMHead.of(model.model, self.layers) if reuse_prefix else None
        self.reuse_prefix = reuse_prefix
        if reuse_prefix and self.head is None:
            self._disable(f"prefix reuse is off for {type(model.model).__name__}: saebench does not know its "
                          "final norm and LM head; every spliced pass runs the full model")
        self._layer_args: dict[tuple[int, int], list[tuple[tuple, dict]]] = {}

    def _disable(self, why: str) -> None:
        self.reuse_prefix, self.head = False, None
        self._notice(why)

    # -- clean passes --------------------------------------------------------------------------

    @torch.no_grad()
    def capture(self, token_ids: Tensor) -> Tensor:
        """(batch, seq, d_model) clean activations at the hookpoint; layers above it are not run
        (except once per batch shape, to record their arguments)."""
        ids = token_ids.to(self.model.device)
        if self.reuse_prefix and tuple(ids.shape) not in self._layer_args:
            return self._record_shape(ids)
        box: list[Tensor] = []

        def grab(hidden: Tensor) -> None:
            box.append(hidden.detach())
            raise StopForward

        with self._keeping_layer_input(ids), hook_at(self.hookpoint, grab):
            try:
                self.model.model(ids, use_cache=False)
            except StopForward:
                pass
        check_finite(box[0], f"the model's activations at {self.hookpoint.name}")
        return box[0]

    @contextmanager
    def _keeping_layer_input(self, ids: Tensor) -> Iterator[None]:
        """For inside-layer hookpoints: keep the clean input of layer `start` seen during the block."""
        if not self.hookpoint.inside_layer:
            yield
            return

        def keep(module, args, kwargs):
            self._layer_input = (ids, module_input(args, kwargs).detach())

        handle = self.layers[self.start].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _clean_layer_input(self, ids: Tensor) -> Tensor:
        """Clean input of layer `start` for `ids`: kept from the last pass over them, else a prefix pass."""
        if self._layer_input is None or not torch.equal(self._layer_input[0], ids):
            def stop(module, args, kwargs):
                raise StopForward

            with self._keeping_layer_input(ids):
                handle = self.layers[self.start].register_forward_pre_hook(stop, with_kwargs=True)
                try:
                    self.model.model(ids, use_cache=False)
                except StopForward:
                    pass
                finally:
                    handle.remove()
        assert self._layer_input is not None
        return self._layer_input[1]

    def _record_shape(self, ids: Tensor) -> Tensor:
        """Full clean pass recording every layer's arguments above the hookpoint; checks the suffix."""
        recorded: list[tuple[tuple, dict]] = []
        seen: list[Tensor] = []
        normed: list[Tensor] = []

        def record(module, args, kwargs):
            recorded.append((args[1:], dict(kwargs)))

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers[self.start:]]
        handles.append(self.head.norm.register_forward_hook(lambda module, args, out: normed.append(out.detach())))
        try:
            with self._keeping_layer_input(ids), hook_at(self.hookpoint, lambda h: seen.append(h.detach()) or None):
                # the suffix is checked on the final norm's output, which the logits are a function of: the LM
                # head runs for the last position only (transformers' logits_to_keep), so no (batch, seq, vocab)
                # tensor is made; older models without the argument run it everywhere
                try:
                    self.model.model(ids, use_cache=False, logits_to_keep=1)
                except TypeError:
                    self.model.model(ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        acts = seen[0]
        check_finite(acts, f"the model's activations at {self.hookpoint.name}")
        if len(recorded) != len(self.layers) - self.start:
            self._disable(f"prefix reuse is off for {type(self.model.model).__name__}: its forward pass does not "
                          "call each decoder layer once; every spliced pass runs the full model")
            return acts
        self._layer_args[tuple(ids.shape)] = recorded
        full = normed[-1]
        suffix = self._suffix(acts, ids, logits=False).normed
        assert suffix is not None
        scale = max(1.0, full.abs().max().item())
        diff = (suffix.float() - full.float()).abs().max().item()
        if diff > 8 * torch.finfo(full.dtype).eps * scale:
            self._disable(f"prefix reuse is off for {type(self.model.model).__name__}: running only the layers above "
                          f"{self.hookpoint.name} changed the final norm's output by {diff:.3g}; every spliced pass "
                          "runs the full model")
        return acts

    # -- passes from a replaced activation -----------------------------------------------------

    def ensure_shape(self, token_ids: Tensor) -> None:
        """Record this batch shape's layer arguments now (a full clean pass, once per shape), so that a
        following `resume` runs only the suffix: hooks installed around it then fire once, on the
        resumed pass alone."""
        ids = token_ids.to(self.model.device)
        if self.reuse_prefix and tuple(ids.shape) not in self._layer_args:
            self._record_shape(ids)

    @torch.no_grad()
    def resume(self, hidden: Tensor, token_ids: Tensor, logits: bool = True) -> ForwardOutput:
        """Logits when the hookpoint's activation is `hidden` (batch, seq, d_model) for `token_ids`.

        Args:
            logits: False skips the LM head where the final norm's output is returned (callers that
                take logits a chunk of positions at a time); the full-pass path always has logits.
        """
        ids = token_ids.to(self.model.device)
        hidden = hidden.to(self.model.device)
        self.ensure_shape(ids)
        if self.reuse_prefix:
            return self._suffix(hidden, ids, logits)
        with hook_at(self.hookpoint, lambda _: hidden):
            return ForwardOutput(self.model.model(ids, use_cache=False).logits, None)

    def _suffix(self, hidden: Tensor, ids: Tensor, logits: bool = True) -> ForwardOutput:
        assert self.head is not None
        args = self._layer_args[tuple(hidden.shape[:2])]
        if self.hookpoint.inside_layer:  # layer `start` runs from its clean input, its sub-layer output replaced
            h, replace = self._clean_layer_input(ids), hook_at(self.hookpoint, lambda _: hidden)
        else:
            h, replace = hidden, nullcontext()
        with replace:
            for layer, (extra, kwargs) in zip(self.layers[self.start:], args):
                out = layer(h, *extra, **kwargs)
                h = out if isinstance(out, Tensor) else out[0]
        normed = self.head.norm(h)
        return ForwardOutput(self.head.logits(normed) if logits else None, normed)

    def logits_from_normed(self, normed: Tensor) -> Tensor:
        """Logits from a stored final-norm output (the LM head alone)."""
        if self.head is None:
            raise RuntimeError("logits_from_normed needs prefix reuse (a known LM head)")
        return self.head.logits(normed.to(self.model.device))


@torch.no_grad()
def capture_all(forwards: Sequence[HookpointForward], token_ids: Tensor) -> tuple[ForwardOutput, list[Tensor]]:
    """One full clean pass for several hookpoints of one model: its output and each hookpoint's activation.

    Inside-layer hookpoints keep their layer's clean input, so resuming from them needs no prefix
    pass. The output carries the final norm's output where the LM head is known, so callers can
    take logits a chunk of positions at a time instead of holding (batch, seq, vocab) per pass.

    Returns:
        The clean pass's output (with logits of the last position only where `normed` is kept),
        and a (batch, seq, d_model) activation per forward, in order.
    """
    model = forwards[0].model
    ids = token_ids.to(model.device)
    seen: dict[int, Tensor] = {}

    def keeper(i: int) -> Callable[[Tensor], None]:
        def keep(hidden: Tensor) -> None:
            seen.setdefault(i, hidden.detach())
        return keep

    head = LMHead.of(model.model, model.layers())
    with ExitStack() as stack:
        for i, fwd in enumerate(forwards):
            stack.enter_context(fwd._keeping_layer_input(ids))
            stack.enter_context(hook_at(fwd.hookpoint, keeper(i)))
        if head is not None:
            handle = head.norm.register_forward_hook(lambda module, args, out: keeper(-1)(out))
            stack.callback(handle.remove)
            # the norm's output is kept, so the LM head runs for the last position only
            # (transformers' logits_to_keep); older models without the argument run it everywhere
            try:
                logits = model.model(ids, use_cache=False, logits_to_keep=1).logits
            except TypeError:
                logits = model.model(ids, use_cache=False).logits
        else:
            logits = model.model(ids, use_cache=False).logits
    for i, fwd in enumerate(forwards):
        check_finite(seen[i], f"the model's activations at {fwd.hookpoint.name}")
    return ForwardOutput(logits, seen.get(-1)), [seen[i] for i in range(len(forwards))]


_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, HookpointForward]]" = weakref.WeakKeyDictionary()


def hookpoint_forward(model: LoadedModel, hookpoint: Hookpoint, reuse_prefix: bool = True) -> HookpointForward:
    """The HookpointForward of (model, hookpoint), shared within the process.

    Sharing keeps each batch shape's recorded layer arguments and suffix check, which cost a full
    pass, to once per process instead of once per task run.
    """
    per_model = _FORWARDS.setdefault(model.model, {})
    # the layer objects are part of the key: a model whose layers were swapped in place (as
    # sae-lens's bridge does) gets its suffix recorded and checked again
    key = (hookpoint.name, reuse_prefix, tuple(id(layer) for layer in model.layers()))
    if key not in per_model:
        per_model[key] = HookpointForward(model, hookpoint, reuse_prefix)
    return per_model[key]
