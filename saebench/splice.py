"""Hooks at a hookpoint: read the activation, or replace it with an encoder's reconstruction.

resid_pre is the input of a decoder layer (a forward pre-hook), resid_post its output, and
attn_out / mlp_out the output of the layer's attention or MLP submodule (forward hooks).
Outputs are a tensor or a tuple whose first entry is the hidden state (layers in older
transformers, attention modules); both are handled. Hooks are removed when the ``with``
block ends, exceptions included.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from saebench.codes import Codec, Codes, EncodeContext
from saebench.errors import SaebenchError
from saebench.models import Hookpoint

ChunkCallback = Callable[[Tensor, Codes, Tensor, Tensor], None]
"""on_chunk(acts, codes, recon, rows): rows are flat (batch * seq) indices of the chunk's activations."""


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the hookpoint has been read."""


@dataclass(frozen=True)
class SpliceConfig:
    """How reconstructions are spliced in."""

    splice_bos: bool = False
    """Also splice BOS / attention-sink positions (default: pass them through, as SAELens does)."""
    chunk_elements: int = 2**24
    """Largest tokens x d_latent block encoded at once (codes are never materialised for all tokens)."""


def sink_mask(token_ids: Tensor, bos_id: int) -> Tensor:
    """(batch, seq) True at attention-sink positions: position 0 and every BOS token."""
    mask = token_ids == bos_id
    mask[:, 0] = True
    return mask


def module_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden-state input of a decoder layer call, from a forward pre-hook's arguments."""
    return args[0] if args else kwargs["hidden_states"]


def _get(args: tuple, kwargs: dict, output, pre: bool) -> Tensor:
    if pre:
        return module_input(args, kwargs)
    return output if isinstance(output, Tensor) else output[0]


def _put(args: tuple, kwargs: dict, output, pre: bool, value: Tensor):
    if pre:
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}
    if isinstance(output, Tensor):
        return value
    return (value, *output[1:])


@contextmanager
def hook_at(hookpoint: Hookpoint, transform: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Apply `transform` to the activation at `hookpoint` during the block; None keeps it."""
    pre = hookpoint.kind == "resid_pre"

    def pre_hook(module, args, kwargs):
        new = transform(_get(args, kwargs, None, True))
        return None if new is None else _put(args, kwargs, None, True, new)

    def post_hook(module, args, kwargs, output):
        new = transform(_get(args, kwargs, output, False))
        return None if new is None else _put(args, kwargs, output, False, new)

    if pre:
        handle = hookpoint.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = hookpoint.module.register_forward_hook(post_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def check_finite(x: Tensor, what: str) -> None:
    """Raise a user error when `x` holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise SaebenchError(f"NaN or inf in {what}; try --dtype float32, or check the model and encoder weights")


def reconstruct(encoder: Codec, acts: Tensor, token_ids: Tensor, positions: Tensor,
                chunk_elements: int, on_chunk: ChunkCallback | None = None,
                rows: Tensor | None = None, sequences: Tensor | None = None) -> Tensor:
    """decode(encode(acts)) in chunks small enough that tokens x d_latent stays bounded.

    Args:
        acts: (tokens, d_in) activations, any dtype; encoded in the encoder's own precision.
        token_ids, positions: (tokens,) the context the encoder gets.
        rows: (tokens,) index of each activation in the flattened batch (passed to on_chunk).
        sequences: (batch, seq) token ids of the batch, when `rows` index its flattened positions: the
            encoder then gets each row's text (EncodeContext.prefix).
    Returns:
        (tokens, d_in) reconstruction in the dtype of `acts`.
    """
    width = max(encoder.spec.d_latent or 0, encoder.spec.d_in, 1)
    step = max(1, chunk_elements // width)
    out = torch.empty_like(acts)
    rows = torch.arange(acts.shape[0], device=acts.device) if rows is None else rows
    context = EncodeContext(token_ids, positions)
    if sequences is not None:
        context = EncodeContext(token_ids, positions, sequences, rows // sequences.shape[1])
    for start in range(0, acts.shape[0], step):
        sl = slice(start, start + step)
        chunk = acts[sl]
        codes = encoder.encode(chunk, context[sl])
        recon = encoder.decode(codes)
        check_finite(recon, f"the reconstruction of encoder {encoder.spec.label!r}")
        if on_chunk is not None:
            on_chunk(chunk, codes, recon, rows[sl])
        out[sl] = recon.to(acts.dtype)
    return out


def splice_activations(hidden: Tensor, token_ids: Tensor, keep: Tensor, encoder: Codec, config: SpliceConfig,
                       on_chunk: ChunkCallback | None = None, where: str = "the hookpoint") -> Tensor:
    """(batch, seq, d) activations with every position not in `keep` replaced by decode(encode(x)).

    Args:
        token_ids, keep: (batch, seq); `keep` marks positions passed through unspliced and unencoded.
        where: the hookpoint's name, for error messages.
    """
    d = hidden.shape[-1]
    if d != encoder.spec.d_in:
        raise SaebenchError(f"encoder {encoder.spec.label!r} has d_in {encoder.spec.d_in} but {where} has width {d}")
    flat = hidden.reshape(-1, d)
    rows = (~keep.to(hidden.device)).reshape(-1).nonzero().squeeze(1)
    seq = hidden.shape[1]
    ids = token_ids.to(hidden.device).reshape(-1)[rows]
    recon = reconstruct(encoder, flat[rows], ids, rows % seq, config.chunk_elements, on_chunk, rows,
                        token_ids.to(hidden.device))
    out = flat.clone()
    out[rows] = recon
    return out.view_as(hidden)


class Splice:
    """Replace the activation at a hookpoint with an encoder's reconstruction.

    Call `set_batch` with the token ids before each forward pass; positions where
    `keep` is True (attention sinks, by default) pass through unspliced and unencoded.
    """

    def __init__(self, hookpoint: Hookpoint, encoder: Codec, config: SpliceConfig,
                 on_chunk: ChunkCallback | None = None):
        self.hookpoint, self.encoder, self.config, self.on_chunk = hookpoint, encoder, config, on_chunk
        self.token_ids: Tensor | None = None
        self.keep: Tensor | None = None

    def set_batch(self, token_ids: Tensor, keep: Tensor) -> None:
        """token_ids, keep: (batch, seq); keep marks positions passed through unspliced."""
        self.token_ids, self.keep = token_ids, keep

    def _transform(self, hidden: Tensor) -> Tensor:
        if self.token_ids is None or self.token_ids.shape != hidden.shape[:2]:
            raise RuntimeError("Splice.set_batch() was not called with this batch's token ids")
        return splice_activations(hidden, self.token_ids, self.keep, self.encoder, self.config, self.on_chunk,
                                  self.hookpoint.name)

    @contextmanager
    def installed(self) -> Iterator["Splice"]:
        with hook_at(self.hookpoint, self._transform):
            yield self
