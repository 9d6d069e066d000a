"""The truncation rule of ``truncation_curve``: keep each token's top or a random part of its active latents.

A part is a fraction of the token's L0 (ceil(f * L0) latents) or a fixed count (min(n, L0)); 'top' keeps the
largest by |activation| (ties: the lower index), 'random' a uniformly random subset. An index a sparse code
lists twice is one latent with the sum of its values.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from saebench.encoders.base import Codes, SparseCodes, dense


def ranked_codes(codes: Codes) -> tuple[Tensor, Tensor]:
    """Each token's active latents, largest |value| first (ties: lower index first), zero-padded.

    Args:
        codes: one chunk of dense (tokens, d_latent) or sparse codes (made dense: a chunk is small).
    Returns:
        (tokens, L) int64 latent indices and their values, L the chunk's largest L0 (at least 1).
    """
    x = dense(codes)
    width = min(max(int((x != 0).sum(1).max()) if len(x) else 0, 1), x.shape[1])
    # topk finds every active latent (|v| > 0 beats the inactive zeros) but leaves ties unordered:
    # order by index, then stably by magnitude
    idx = x.abs().float().topk(width, dim=1).indices.sort(dim=1).values
    order = x.gather(1, idx).abs().float().argsort(dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    return idx, x.gather(1, idx)


def random_ranks(values: Tensor, gen: torch.Generator) -> Tensor:
    """(tokens, L) rank of each slot of ranked codes in a uniformly random order of each token's active
    slots (inactive slots last), drawn on the CPU with `gen`."""
    noise = torch.rand(values.shape, generator=gen, dtype=torch.float64)
    order = noise.masked_fill(values.cpu() == 0, 2.0).argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(values.shape[1]).expand_as(order))
    return ranks.to(values.device)


def kept_count(l0: Tensor, fraction: float) -> Tensor:
    """ceil(fraction * l0) per token; a product a rounding error above an integer (0.14 * 50 =
    7.000000000000001) counts as that integer."""
    return torch.ceil(fraction * l0.double() - 1e-9).long()


@dataclass(frozen=True)
class Keep:
    """How many of a token's L0 active latents a pass keeps: ceil(amount * L0) (kind 'fraction', amount in
    (0, 1]) or min(amount, L0) (kind 'count', EleutherAI's "fixed number of active latents")."""

    kind: str
    amount: float | int

    def of(self, l0: Tensor) -> Tensor:
        """(tokens,) latents kept per token, from (tokens,) L0."""
        return kept_count(l0, self.amount) if self.kind == "fraction" else l0.clamp(max=int(self.amount))

    @property
    def everything(self) -> bool:
        """Whether it keeps every active latent at any L0 (the encoder itself)."""
        return self.kind == "fraction" and self.amount == 1


FULL = Keep("fraction", 1.0)


def keep_first(indices: Tensor, values: Tensor, ranks: Tensor | None, keep: Keep, d_latent: int) -> SparseCodes:
    """Ranked codes keeping each token's first keep.of(L0) active latents in the order `ranks` (None: the
    ranked order, i.e. the largest)."""
    ranks = torch.arange(values.shape[1], device=values.device).expand_as(values) if ranks is None else ranks
    n = keep.of((values != 0).sum(1))
    return SparseCodes(indices, torch.where(ranks < n[:, None].to(ranks.device), values, 0), d_latent)


def truncate(codes: Codes, fraction: float | None, mode: str, gen: torch.Generator | None = None,
             count: int | None = None) -> Codes:
    """`codes` keeping ceil(fraction * L0) active latents per token, or min(count, L0) when `count` is given
    (fraction None): the largest by |value| ('top'; ties: lower index) or a uniformly random subset ('random',
    drawn with `gen`); sparse codes stay sparse."""
    keep = Keep("count", count) if count is not None else Keep("fraction", fraction)
    indices, values = ranked_codes(codes)
    ranks = None if mode == "top" else random_ranks(values, gen or torch.Generator().manual_seed(0))
    sparse = isinstance(codes, SparseCodes)
    out = keep_first(indices, values, ranks, keep, codes.d_latent if sparse else codes.shape[1])
    return out if sparse else dense(out)
