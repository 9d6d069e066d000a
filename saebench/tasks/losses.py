"""Next-token losses of several passes against one clean pass, a chunk of positions at a time.

Holding (batch, 1024, 49k) float32 log-probabilities per pass would take gigabytes, so passes
hand over the final norm's output (or, where the LM head is unknown, their logits) and the
vocabulary-sized work is done CHUNK_POSITIONS positions at a time, the clean log-probabilities
once per chunk for every pass.
"""

import torch
from torch import Tensor

from saebench.forward import ForwardOutput, LMHead

CHUNK_POSITIONS = 256
"""Positions whose (positions, vocab) log-probabilities are held at once."""

HeadInput = tuple[Tensor, bool]
"""(the final norm's output, True) or (logits, False), (batch, seq, ...)."""


def head_input(out: ForwardOutput, head: LMHead | None) -> HeadInput:
    """What `next_token_losses` takes from a pass: the norm's output where the LM head is known."""
    if head is not None and out.normed is not None:
        return out.normed, True
    assert out.logits is not None
    return out.logits, False


@torch.no_grad()
def next_token_losses(head: LMHead | None, clean: HeadInput, passes: dict[str, HeadInput | None],
                      batch: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Per-prediction clean CE, and each pass's ΔCE and KL(clean || pass), all (batch, seq-1) float64.

    The prediction at position p is of token p+1. A pass given as None reproduced the clean
    activations exactly: its ΔCE and KL are 0 at every position.
    """
    n_pred = batch.shape[1] - 1
    targets = batch[:, 1:].to(clean[0].device)
    ce_clean = torch.zeros(batch.shape[0], n_pred, dtype=torch.float64)
    dce = {k: torch.zeros(batch.shape[0], n_pred, dtype=torch.float64) for k in passes}
    kl = {k: torch.zeros(batch.shape[0], n_pred, dtype=torch.float64) for k in passes}

    def logp(src: HeadInput, b: int, sl: slice) -> Tensor:
        tensor, normed = src
        logits = head.logits(tensor[b, sl]) if normed and head is not None else tensor[b, sl]
        return torch.log_softmax(logits.float(), -1)

    for b in range(batch.shape[0]):
        for start in range(0, n_pred, CHUNK_POSITIONS):
            sl = slice(start, min(start + CHUNK_POSITIONS, n_pred))
            lp_clean = logp(clean, b, sl)
            tgt = targets[b, sl, None]
            ce = -lp_clean.gather(-1, tgt).squeeze(-1)
            ce_clean[b, sl] = ce.double().cpu()
            p_clean = lp_clean.exp()
            for key, src in passes.items():
                if src is None:
                    continue
                lp = logp(src, b, sl)
                dce[key][b, sl] = (-lp.gather(-1, tgt).squeeze(-1) - ce).double().cpu()
                kl[key][b, sl] = (p_clean * (lp_clean - lp)).sum(-1).double().cpu()
    return ce_clean, dce, kl
