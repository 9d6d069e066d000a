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

if TYPE_CHECKING:
    from saebench.models import LoadedModel

LATENTS = "latents"
"""Capability: codes are latent activations (L0, L1, density metrics apply)."""
DECODER_DICTIONARY = "decoder_dictionary"
"""Capability: the encoder has a decoder dictionary `W_dec` of shape (d_latent, d_in)."""


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
        """The spec string a user would type: 'name' or 'name:arg'."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


@dataclass(frozen=True)
class EncodeContext:
    """Where the activations being encoded come from."""

    token_ids: Tensor
    """(tokens,) id of the token at each activation."""
    positions: Tensor
    """(tokens,) position of each activation in its context."""


@dataclass(frozen=True)
class SparseCodes:
    """Codes as (indices, values) of the active latents, for wide dictionaries."""

    indices: Tensor  # (tokens, k) int64
    values: Tensor  # (tokens, k)
    d_latent: int


Codes = Tensor | SparseCodes
"""Dense (tokens, d_latent) or sparse codes."""


class EvalData(Protocol):
    """What an encoder may ask of the evaluation data before it runs (see Encoder.prepare)."""

    def activation_mean(self) -> Tensor:
        """(d_in,) mean activation at the hookpoint over the evaluation tokens (sinks excluded)."""
        ...


@dataclass(frozen=True)
class BuildContext:
    """What an encoder factory gets besides its argument."""

    model: "LoadedModel"
    hookpoint: str | None
    """The --hookpoint the user asked for, if any."""
    cache_dir: Path
    seed: int = 0
    progress: bool = True


class Encoder(ABC):
    """encode(acts, context) -> codes; decode(codes) -> reconstruction."""

    spec: EncoderSpec
    capabilities: frozenset[str] = frozenset()
    training_context: int | None = None
    """Tokens per context the encoder was trained on, when known (an SAE's metadata.context_size)."""

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

    @property
    def has_latents(self) -> bool:
        return LATENTS in self.capabilities


def parse_encoder_arg(spec: str) -> tuple[str, str | None]:
    """Split 'name:arg' into ('name', 'arg'); a plain 'name' gives ('name', None)."""
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg if sep else None)


def dense(codes: Codes) -> Tensor:
    """Codes as a dense (tokens, d_latent) tensor."""
    if isinstance(codes, SparseCodes):
        out = torch.zeros(codes.values.shape[0], codes.d_latent, dtype=codes.values.dtype, device=codes.values.device)
        return out.scatter_(1, codes.indices, codes.values)
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
