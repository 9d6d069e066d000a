"""Standard errors that respect how tokens are grouped.

Tokens of one context are correlated, so every per-token mean is treated as a ratio of
per-context sums, R = sum(a_i) / sum(b_i), with the cluster-robust (linearised) variance
    Var(R) = m / (m - 1) * sum_i (a_i - R b_i)^2 / (sum_i b_i)^2
over the m contexts (Cochran, Sampling Techniques, 3rd ed., section 6.4). For a plain mean
b_i is the context's token count; for CE loss recovered a_i and b_i are the context sums of
(ce_zero - ce_spliced) and (ce_zero - ce_clean).
"""

import math

import torch
from torch import Tensor


def ratio_and_se(a: Tensor, b: Tensor) -> tuple[float | None, float | None]:
    """Ratio of sums and its cluster-robust standard error; None where undefined."""
    a, b = a.double(), b.double()
    denom = b.sum().item()
    if denom == 0:
        return None, None
    r = a.sum().item() / denom
    m = a.numel()
    if m < 2:
        return r, None
    var = m / (m - 1) * ((a - r * b) ** 2).sum().item() / denom**2
    return r, math.sqrt(var)


def sum_by_row(values: Tensor, mask: Tensor) -> Tensor:
    """(batch, seq) values and mask -> (batch,) float64 sums over masked positions."""
    return (values.double() * mask).sum(dim=1)


class RangeMeans:
    """Streaming means over ranges of positions, with cluster-robust standard errors (clusters = sequences).

    For range r and sequence s, a_sr is the sum of the values at the range's scored positions and
    c_sr their count; the mean is sum(a) / sum(c) and its variance the linearised ratio variance of
    `ratio_and_se`, over the sequences with c_sr > 0. Only five sums per range are kept, so memory
    does not grow with the number of sequences.

    Args:
        member: (positions, ranges) 0/1 membership of each position in each range; None makes
            every position its own range.
    """

    def __init__(self, positions: int, member: Tensor | None = None):
        self.member = None if member is None else member.double()
        size = positions if member is None else member.shape[1]
        self.sums = torch.zeros(6, size, dtype=torch.float64)  # a, c, a^2, c^2, a*c, clusters

    def add(self, values: Tensor, weights: Tensor) -> None:
        """values, weights: (sequences, positions); weights 1 where a position is scored, else 0."""
        c = weights.double().cpu()
        a = torch.where(c > 0, values.double().cpu(), 0.0) * c  # an unscored NaN must not poison the sums
        if self.member is not None:
            a, c = a @ self.member, c @ self.member
        self.sums += torch.stack([a.sum(0), c.sum(0), (a * a).sum(0), (c * c).sum(0), (a * c).sum(0),
                                  (c > 0).double().sum(0)])

    def merge(self, other: "RangeMeans") -> None:
        """Add another batch's sums (sequences it holds are clusters of their own)."""
        self.sums += other.sums

    def count(self) -> Tensor:
        """(ranges,) scored positions in each range."""
        return self.sums[1]

    def mean_se(self) -> tuple[Tensor, Tensor]:
        """(ranges,) means (NaN where nothing was scored) and standard errors (NaN with fewer than 2 clusters)."""
        a, c, aa, cc, ac, m = self.sums
        mean = a / c
        var = m / (m - 1) * (aa - 2 * mean * ac + mean**2 * cc) / c**2
        se = var.clamp_min(0).sqrt()
        return mean, torch.where(m >= 2, se, torch.nan)
