"""The encoder interface: small, typed, and not shaped like any one kind of encoder; and the one way an
encoder is built from its spec string.

No encoder has to expose W_enc or W_dec; one with a decoder dictionary says so through the
``decoder_dictionary`` capability, one whose codes are latents (so L0, density, ... mean
something) through ``latents``. An LLM-simulated encoder reads text, so ``encode`` gets the
token ids and positions of the activations it encodes.

An encoder with the FITS capability is fitted right after it is built, on the build context's
training set; what it learned is cached under ``<cache>/fitted/`` by a hash of its spec and of the
training data, so the next run loads it instead of training again.

Plugins import everything they need from here: the codes and their context (defined one layer
down, in saebench.codes, where splicing uses them) and training sets (saebench.capture) are
re-exported.
"""

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from saebench.capture import DEFAULT_CORPUS, TensorTrainingSet, TrainingSet, corpus_training_set
from saebench.checkpoints import save_atomic
from saebench.codes import (
    Codec,
    Codes,
    EncodeContext,
    EncoderSpec,
    SparseCodes,
    dense,
    latent_stats,
    unknown_text,
)
from saebench.encoders.specs import split_hookpoint
from saebench.errors import SaebenchError, did_you_mean
from saebench.models import LoadedModel
from saebench.records import config_hash
from saebench.registry import ENCODER_GROUP, available, load_plugin

__all__ = ["DECODER_DICTIONARY", "FITS", "LATENTS", "BuildContext", "Codec", "Codes", "EncodeContext", "Encoder",
           "EncoderSpec", "EvalData", "SparseCodes", "TensorTrainingSet", "TrainingSet", "build_from_spec", "dense",
           "encoder_class", "fit_cached", "latent_stats", "parse_encoder_arg", "unknown_text"]

LATENTS = "latents"
"""Capability: codes are latent activations (L0, L1, density metrics apply)."""
DECODER_DICTIONARY = "decoder_dictionary"
"""Capability: the encoder has a decoder dictionary `W_dec` of shape (d_latent, d_in), and decode(codes) is
codes @ W_dec + decode(0)."""
FITS = "fits"
"""Capability: the encoder learns from training activations (Encoder.fit) before it encodes; saebench
fits it when it is built and caches what it learned by a hash of its spec and of the training data."""


class EvalData(Protocol):
    """What an encoder may ask of the evaluation data before it runs (see Encoder.prepare)."""

    def activation_mean(self) -> Tensor:
        """(d_in,) mean activation at the hookpoint over the evaluation tokens (sinks excluded)."""
        ...


@dataclass(frozen=True)
class BuildContext:
    """What an encoder factory gets besides its argument.

    A run on a language model has `model`; a task without one (synthetic data) gives the width
    `width` and its own `training` set, and may give a known `dictionary`.
    """

    model: LoadedModel | None
    hookpoint: str | None
    """The --hookpoint the user asked for, if any."""
    cache_dir: Path | None
    """Where fitted encoders are cached; None: never cached (cheap fits, e.g. synthetic data)."""
    seed: int = 0
    """The run's --seed (which evaluation data is drawn)."""
    progress: bool = True
    width: int | None = None
    """d_in of the activations when there is no model (else the model's width)."""
    training: TrainingSet | None = None
    """Training activations given by the task; None: the corpus's training split at the hookpoint."""
    dictionary: Tensor | None = None
    """(d_latent, d_in) known true dictionary: encoders that would learn a dictionary use it instead."""
    d_latent: int | None = None
    """Dictionary width for encoders that learn one, when their options do not set it."""
    fit_seed: int = 0
    """Seed of encoders saebench trains (initialisation, batch order) unless their ?seed= option says."""
    option_defaults: dict[str, dict[str, str]] = field(default_factory=dict)
    """Option values a task sets for the encoders it builds, by family name ('*': every family), e.g.
    synthetic's full-batch steps; a spec's own options win, and keys a family does not have are ignored."""

    corpus: str = DEFAULT_CORPUS
    """The run's --corpus: training sets and latent samples come from its training split."""
    batch_size: int = 16
    """Contexts per forward pass when capturing training sets and latent samples (the run's --batch-size)."""

    memo: dict[tuple[str, str | None], "Encoder"] = field(default_factory=dict, compare=False, repr=False)
    """Encoders built so far in this run, by (spec, hookpoint): an inner encoder named twice (``sae:default``
    and ``ito:sae:default``) is built and fitted once."""

    @property
    def d_in(self) -> int:
        """Width of the activations encoders read."""
        if self.model is not None:
            return self.model.d_model
        if self.width is None:
            raise ValueError("a BuildContext without a model needs a width")
        return self.width

    def build(self, spec: str) -> "Encoder":
        """Build (and fit, if it learns) the encoder `spec`, e.g. the inner SAE of ``ito:sae:default``."""
        key = (spec, self.hookpoint)
        if key not in self.memo:
            self.memo[key] = build_from_spec(spec, self)
        return self.memo[key]

    def training_set(self, hookpoint: str | None = None, tokens: int | None = None) -> TrainingSet:
        """The task's training activations, else the corpus training split's at `hookpoint` (default: the
        build's hookpoint, else the model preset's): `tokens` of them (default 200k, as the default SAE's)."""
        if self.training is not None:
            return self.training
        if self.model is None:
            raise SaebenchError("this encoder learns from training activations, which this task does not give")
        extra = {"tokens": tokens} if tokens else {}
        return corpus_training_set(self.model, hookpoint or self.hookpoint, self.corpus, self.batch_size,
                                   self.progress, **extra)


class Encoder(ABC):
    """encode(acts, context) -> codes; decode(codes) -> reconstruction."""

    spec: EncoderSpec
    capabilities: frozenset[str] = frozenset()
    training_context: int | None = None
    """Tokens per context the encoder was trained on, when known (an SAE's metadata.context_size)."""
    fit_version: int = 1
    """Bumped when a family's fit() changes what it learns, so fits cached by older code are not reused."""
    train_tokens: int | None = None
    """Corpus activations a FITS encoder learns from on a model (None: 200k, as the default SAE)."""
    encode_flops: float | None = None
    """FLOPs per token of encode() (a multiply-add counts 2), when known."""
    training_flops: float | None = None
    """FLOPs saebench spent training the encoder (forward and backward; an ITO or sparse-coding encoder on an
    inner encoder's dictionary reports the inner's), when known."""
    data_used: dict[str, dict[str, Any]] | None = None
    """What corpus data saebench trained or sampled the encoder on, by use ('fit', 'latent_sample'): the key of
    each training set or latent sample (model, hookpoint, corpus, tokens, ...); records keep it as
    extra.encoder_data."""

    @classmethod
    @abstractmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "Encoder":
        """Build the encoder from the text after the colon in ``--encoder name:arg``."""

    def prepare(self, data: EvalData) -> None:
        """Fit anything that depends on the evaluation data (default: nothing)."""

    @abstractmethod
    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        """Encode (tokens, d_in) activations into codes."""

    @abstractmethod
    def decode(self, codes: Codes) -> Tensor:
        """Decode codes into a (tokens, d_in) reconstruction."""

    def fit(self, data: TrainingSet, progress: bool = True) -> None:
        """Learn from training activations (encoders with the FITS capability)."""
        raise NotImplementedError(f"encoder {self.spec.label!r} does not learn from data")

    def fitted_state(self) -> dict[str, Any]:
        """What fit() learned, as tensors and numbers (saved in the cache)."""
        raise NotImplementedError

    def load_fitted(self, state: dict[str, Any]) -> None:
        """Restore what fit() learned from fitted_state()'s output."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Counters the encoder keeps since it was built (an LLM simulator's requests, failures, ...), stored in
        each record's extra.encoder_report; default: none."""
        return {}

    @property
    def has_latents(self) -> bool:
        return LATENTS in self.capabilities


def parse_encoder_arg(spec: str) -> tuple[str, str | None]:
    """Split 'name:arg' into ('name', 'arg'), 'name?k=1' into ('name', '?k=1'); a plain 'name' gives ('name', None)."""
    colon, query = spec.find(":"), spec.find("?")
    if query != -1 and (colon == -1 or query < colon):
        return spec[:query].strip(), spec[query:]
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg if sep else None)


def encoder_class(spec: str) -> type[Encoder]:
    """The registered class of `spec`'s family; an unknown name gets a 'did you mean'."""
    name, _ = parse_encoder_arg(split_hookpoint(spec)[0])
    if name not in available(ENCODER_GROUP):
        raise SaebenchError(f"unknown encoder {name!r}{did_you_mean(name, available(ENCODER_GROUP))}; "
                            "`saebench list encoders` shows them all")
    return load_plugin(ENCODER_GROUP, name)


def build_from_spec(spec: str, build: BuildContext) -> Encoder:
    """Build the encoder `spec` ('name[:arg][?options]', no '@hookpoint') and fit it if it learns."""
    name, arg = parse_encoder_arg(spec)
    enc = encoder_class(spec).from_arg(arg, build)
    if FITS in enc.capabilities:
        fit_cached(enc, build)
    return enc


def fit_cached(enc: Encoder, build: BuildContext) -> None:
    """Fit `enc` on the build's training set, or load what an earlier run with the same spec and data learned."""
    data = build.training_set(enc.spec.hookpoint, enc.train_tokens)
    enc.data_used = {**(enc.data_used or {}), "fit": data.key}
    path = None
    if build.cache_dir is not None:
        key = config_hash({"encoder": enc.spec.to_dict(), "data": data.key, "fit_version": enc.fit_version})
        path = Path(build.cache_dir) / "fitted" / f"{enc.spec.name}-{key}.pt"
        if path.exists():
            try:
                enc.load_fitted(torch.load(path, weights_only=False))
                return
            except Exception as exc:  # a corrupt cache entry costs a refit, nothing more
                print(f"saebench: cached fit {path} is unreadable ({exc}); fitting again", file=sys.stderr)
    if build.progress and path is not None:
        print(f"saebench: fitting {enc.spec.label} (once; cached in {path})", file=sys.stderr, flush=True)
    enc.fit(data, build.progress)
    if path is not None:
        save_atomic(path, enc.fitted_state())
