"""What splicing needs of an encoder, and the codes it produces: the lowest layer of the encoder interface.

`splice`, `forward` and `capture` run encoders without knowing their families: they call the `Codec`
protocol (a spec, `encode`, `decode`), which every `saebench.encoders.base.Encoder` implements.
Plugins import these names from `saebench.encoders.base`, which re-exports them.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


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
    display: dict[str, Any] = field(default_factory=dict, compare=False)
    """What leaderboards show beside the label (an SAE's architecture as trained): written to records, never
    hashed, so adding a display value changes no record's or cache's key."""

    @property
    def label(self) -> str:
        """The spec string a user would type: 'name', 'name:arg' or 'name?options'."""
        if self.arg is None:
            return self.name
        return f"{self.name}{self.arg}" if self.arg.startswith("?") else f"{self.name}:{self.arg}"

    def to_dict(self) -> dict[str, Any]:
        """The spec's identity (hashed into records and caches): everything but `display`."""
        out = asdict(self) | {"label": self.label}
        del out["display"]
        return out


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


class Codec(Protocol):
    """The part of the encoder interface that splicing and capture call (every Encoder has it)."""

    spec: EncoderSpec

    def encode(self, acts: Tensor, context: EncodeContext) -> "Codes":
        """Encode (tokens, d_in) activations into codes."""
        ...

    def decode(self, codes: "Codes") -> Tensor:
        """Decode codes into a (tokens, d_in) reconstruction."""
        ...


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
