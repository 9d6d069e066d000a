"""The encoder interface: small, typed, and not shaped like any one kind of encoder.

No encoder has to expose W_enc or W_dec; one with a decoder dictionary says so through the
``decoder_dictionary`` capability, one whose codes are latents (so L0, density, ... mean
something) through ``latents``. An LLM-simulated encoder reads text, so ``encode`` gets the
token ids and positions of the activations it encodes.
"""

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from saebench.errors import SaebenchError

if TYPE_CHECKING:
    from saebench.models import LoadedModel

LATENTS = "latents"
"""Capability: codes are latent activations (L0, L1, density metrics apply)."""
DECODER_DICTIONARY = "decoder_dictionary"
"""Capability: the encoder has a decoder dictionary `W_dec` of shape (d_latent, d_in), and decode(codes) is
codes @ W_dec + decode(0)."""
FITS = "fits"
"""Capability: the encoder learns from training activations (Encoder.fit) before it encodes; saebench
fits it when it is built and caches what it learned by a hash of its spec and of the training data."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that identifies an encoder and changes its outputs (hashed into records)."""

    name: str
    """Registry key, e.g. 'sae'."""
    arg: str | None
    """What followed the colon in the spec string, e.g. 'default'."""
    hookpoint: str | None
    """Canonical hookpoint the encoder reads and writes; None means 'the run's hookpoint'."""
    d_in: int
    d_latent: int | None
    """Width of the codes; None when the codes are not latents."""
    params: dict[str, Any] = field(default_factory=dict)
    """Every further parameter that changes outputs (architecture, k, weights digest, ...)."""

    @property
    def label(self) -> str:
        """The spec string a user would type: 'name', 'name:arg' or 'name?options'."""
        if self.arg is None:
            return self.name
        return f"{self.name}{self.arg}" if self.arg.startswith("?") else f"{self.name}:{self.arg}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


@dataclass(frozen=True)
class EncodeContext:
    """Where the activations being encoded come from.

    An encoder that reads text (an LLM-simulated one) gets each row's whole sequence: `sequences`
    holds the token ids of the batch's sequences and `sequence` says which one each row is from, so
    ``prefix(i)`` is the text up to row i's token; chunking slices the rows, never the sequences.
    """

    token_ids: Tensor
    """(tokens,) id of the token at each activation."""
    positions: Tensor
    """(tokens,) position of each activation in its context."""
    sequences: Tensor | None = None
    """(batch, seq) token ids of the sequences the rows come from; None when there is no text."""
    sequence: Tensor | None = None
    """(tokens,) index into `sequences` of each row's sequence."""

    def __getitem__(self, rows: slice | Tensor) -> "EncodeContext":
        """The context of a subset of the rows (the same sequences)."""
        seq = None if self.sequence is None else self.sequence[rows]
        return EncodeContext(self.token_ids[rows], self.positions[rows], self.sequences, seq)

    @property
    def has_text(self) -> bool:
        return self.sequences is not None and self.sequence is not None

    def prefix(self, row: int, window: int | None = None) -> Tensor:
        """Token ids of row `row`'s sequence up to and including its token (the last `window` of them)."""
        if not self.has_text:
            raise ValueError("this EncodeContext carries no text (sequences)")
        end = int(self.positions[row]) + 1
        start = 0 if window is None else max(0, end - window)
        return self.sequences[int(self.sequence[row]), start:end]


def unknown_text(n: int, device: torch.device | str = "cpu") -> EncodeContext:
    """Context of `n` activations that come without text (training sets, synthetic data)."""
    return EncodeContext(torch.zeros(n, dtype=torch.long, device=device), torch.ones(n, dtype=torch.long, device=device))


@dataclass(frozen=True)
class SparseCodes:
    """Codes as (indices, values) of the active latents, for wide dictionaries."""

    indices: Tensor  # (tokens, k) int64; an index listed twice in a row means the sum of its values
    values: Tensor  # (tokens, k)
    d_latent: int


Codes = Tensor | SparseCodes
"""Dense (tokens, d_latent) or sparse codes."""


class EvalData(Protocol):
    """What an encoder may ask of the evaluation data before it runs (see Encoder.prepare)."""

    def activation_mean(self) -> Tensor:
        """(d_in,) mean activation at the hookpoint over the evaluation tokens (sinks excluded)."""
        ...


class TrainingSet(ABC):
    """Activations an encoder may learn from, and what identifies them (hashed into cached fits)."""

    key: dict[str, Any]
    """What the activations are (model, hookpoint, corpus split, count, ... or a synthetic config)."""
    codes: Tensor | None = None
    """(n, d_latent) true codes of the activations, when a task knows them (synthetic, known-codes regime):
    encoders that learn then regress them, and fit their dictionary to them by least squares."""

    @abstractmethod
    def activations(self) -> Tensor:
        """(n, d_in) float32 training activations (computed once, then kept)."""


class TensorTrainingSet(TrainingSet):
    """Training activations already in memory (a task's synthetic data)."""

    def __init__(self, acts: Tensor, key: dict[str, Any], codes: Tensor | None = None):
        self._acts, self.key, self.codes = acts.float(), key, codes

    def activations(self) -> Tensor:
        return self._acts


@dataclass(frozen=True)
class BuildContext:
    """What an encoder factory gets besides its argument.

    A run on a language model has `model`; a task without one (synthetic data) gives the width
    `width` and its own `training` set, and may give a known `dictionary`.
    """

    model: "LoadedModel | None"
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
        from saebench.encoders.build import build_from_spec

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
        from saebench.training import corpus_training_set

        extra = {"tokens": tokens} if tokens else {}
        return corpus_training_set(self.model, hookpoint or self.hookpoint, self.progress, **extra)


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


def dense(codes: Codes) -> Tensor:
    """Codes as a dense (tokens, d_latent) tensor."""
    if isinstance(codes, SparseCodes):
        out = torch.zeros(codes.values.shape[0], codes.d_latent, dtype=codes.values.dtype, device=codes.values.device)
        return out.scatter_add_(1, codes.indices, codes.values)  # an index given twice adds (a pursuit's)
    return codes


def latent_stats(codes: Codes, d_latent: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token L0, per-token L1, and per-latent firing counts of a chunk of codes."""
    if isinstance(codes, SparseCodes):
        active = codes.values != 0
        fired = torch.zeros(d_latent, dtype=torch.float64, device=codes.values.device)
        fired.scatter_add_(0, codes.indices[active], torch.ones_like(codes.values[active], dtype=torch.float64))
        return active.sum(1).double(), codes.values.abs().double().sum(1), fired
    active = codes != 0
    return active.sum(1).double(), codes.abs().double().sum(1), active.sum(0).double()
