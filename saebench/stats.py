"""Standard errors that respect how tokens are grouped.

Tokens of one context are correlated, so every per-token mean is treated as a ratio of
per-context sums, R = sum(a_i) / sum(b_i), with the cluster-robust (linearised) variance
    Var(R) = m / (m - 1) * sum_i (a_i - R b_i)^2 / (sum_i b_i)^2
over the m contexts (Cochran, Sampling Techniques, 3rd ed., section 6.4). For a plain mean
b_i is the context's token count; for CE loss recovered a_i and b_i are the context sums of
(ce_zero - ce_spliced) and (ce_zero - ce_clean).
"""

import math

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
