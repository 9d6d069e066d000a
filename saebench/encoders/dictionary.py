"""What the encoders beyond the linear SAE share: a decoder dictionary, an inner encoder, fitting.

O'Neill, Gumran & Klindt (2024, "Compute Optimal Inference and Provable Amortisation Gap in Sparse
Autoencoders") keep the dictionary and change only how codes are inferred: an MLP encoder, sparse
coding, or inference-time optimisation on an SAE's decoder. Here each of those families takes its
dictionary from, in order: an inner encoder with a decoder dictionary (``ito:sae:default``); the
known true dictionary a task gives (synthetic data, known-dictionary regime); else it learns one.

Spec syntax: options at the end belong to the outer encoder (``ito:sae:default?k=16`` sets ito's k);
an inner spec with options of its own goes in parentheses (``ito:(sae:default?context_len=1024)?k=16``).
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.encoders.base import (
    DECODER_DICTIONARY,
    BuildContext,
    Codes,
    Encoder,
    dense,
    unknown_text,
)
from saebench.encoders.specs import apply_options, split_options
from saebench.errors import SaebenchError

L0_SAMPLE = 8192
"""Training activations on which an inner encoder's mean L0 is measured (the default k)."""


def split_inner(arg: str | None) -> tuple[str | None, dict[str, str]]:
    """'sae:default?k=16' -> ('sae:default', {'k': '16'}); '(sae:default?k=1)?k=16' -> ('sae:default?k=1', {'k': '16'})."""
    if arg and arg.startswith("("):
        depth = 0
        for i, char in enumerate(arg):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                inner, rest = arg[1:i], arg[i + 1:]
                if rest and not rest.startswith("?"):
                    raise SaebenchError(f"unexpected {rest!r} after the parenthesised inner encoder in {arg!r}")
                return inner or None, split_options(rest)[1] if rest else {}
        raise SaebenchError(f"unbalanced parentheses in encoder argument {arg!r}")
    return split_options(arg)


def family_options(config: Any, options: dict[str, str], build: BuildContext, what: str) -> Any:
    """`config` (a dataclass of a family's options) with the task's defaults, then the spec's options, applied."""
    names = {f.name for f in fields(config)}
    given = build.option_defaults.get("*", {}) | build.option_defaults.get(what, {})
    defaults = {k: v for k, v in given.items() if k in names}
    return apply_options(apply_options(config, defaults, what), options, what)


@dataclass(frozen=True)
class Dictionary:
    """A decoder: reconstruction = codes @ W + b."""

    W: Tensor
    """(d_latent, d_in) float32."""
    b: Tensor
    """(d_in,) float32."""
    source: dict[str, Any]
    """Where it comes from (for the spec): the inner encoder's spec, or 'given'."""


def dictionary_of(inner: Encoder, family: str) -> Dictionary:
    """The decoder dictionary of `inner`; one clear error when it has none."""
    if DECODER_DICTIONARY not in inner.capabilities:
        raise SaebenchError(f"{family} needs an encoder with a decoder dictionary; {inner.spec.label!r} has none "
                            "(use e.g. sae:default or sae:<path>)")
    W = inner.W_dec.detach().float()
    with torch.no_grad():  # decode(0) is the decoder's offset, whatever the encoder calls it
        b = inner.decode(torch.zeros(1, W.shape[0], dtype=inner.W_dec.dtype, device=W.device))[0].float()
    return Dictionary(W, b, {"inner": inner.spec.to_dict()})


def resolve_dictionary(inner_arg: str | None, build: BuildContext, family: str) -> tuple[Encoder | None,
                                                                                       Dictionary | None]:
    """(inner encoder, its dictionary), or (None, the task's known dictionary), or (None, None): learn one."""
    if inner_arg:
        inner = build.build(inner_arg)
        return inner, dictionary_of(inner, family)
    if build.dictionary is not None:
        W = build.dictionary.float()
        return None, Dictionary(W, torch.zeros(W.shape[1], device=W.device), {"given": "task's true dictionary"})
    return None, None


def mean_l0(inner: Encoder, build: BuildContext) -> float:
    """Mean number of active latents of `inner` on (up to L0_SAMPLE) training activations."""
    acts = build.training_set(inner.spec.hookpoint, L0_SAMPLE).activations()[:L0_SAMPLE].to(inner.W_dec.device)
    with torch.no_grad():
        codes = dense(inner.encode(acts, unknown_text(len(acts), acts.device)))
    return float((codes != 0).sum(1).float().mean())


def decode_with(W: Tensor, b: Tensor, inner: Encoder | None, codes: Codes) -> Tensor:
    """Reconstruction through the inner encoder's own decode (exactly its splice), else codes @ W + b."""
    codes = dense(codes)
    if inner is not None:
        return inner.decode(codes.to(inner.W_dec.dtype))
    return codes.float() @ W.to(codes.device) + b.to(codes.device)


def unit_rows(W: Tensor) -> Tensor:
    """Rows scaled to unit norm (atoms of a learned dictionary: O'Neill et al. normalise every decoder's atoms,
    section 3.3)."""
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)


def adam_steps(params: list[Tensor], loss_of: Callable[[Tensor], Tensor], acts: Tensor, steps: int,
               batch_size: int, lr: float, seed: int, progress: bool, desc: str,
               after_step: Callable[[], None] | None = None) -> None:
    """`steps` Adam steps on minibatches of `acts` (full batch when it is no larger than `batch_size`).

    Written here rather than with sae-lens's SAETrainer: these fits are small (a synthetic problem is
    1024 x 8 activations for 20k full-batch steps) and the trainer's per-step bookkeeping would cost
    more than the step; sae-lens still trains the SAEs saebench ships (saebench.encoders.default_sae).
    """
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    full = len(acts) <= batch_size
    order, cursor = torch.randperm(len(acts), generator=gen), 0
    for _ in tqdm(range(steps), desc=desc, disable=not progress, unit="step", mininterval=1.0):
        if full:
            batch = acts
        else:
            if cursor + batch_size > len(acts):
                order, cursor = torch.randperm(len(acts), generator=gen), 0
            batch = acts[order[cursor:cursor + batch_size].to(acts.device)]
            cursor += batch_size
        opt.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        opt.step()
        if after_step is not None:
            after_step()


def least_squares_dictionary(codes: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
    """(W, b) minimising |acts - codes @ W - b|^2: the dictionary that known codes imply."""
    design = torch.cat([codes.float(), torch.ones(len(codes), 1, device=codes.device)], 1)
    solution = torch.linalg.lstsq(design.double(), acts.double()).solution.float()
    return solution[:-1], solution[-1]
