"""The sums ce_kl accumulates per context, and the next-token statistics they come from.

Every pass (clean, zero, mean, each encoder) leaves per-context sums (CE, KL, squared error, cosine,
L0, L1; latent firing counts), so the metrics and their clustered standard errors are ratios of sums
(saebench.stats), and the reference passes' sums can be cached and restored.
"""

import torch
from torch import Tensor

from saebench.encoders.base import Codes, SparseCodes, latent_stats
from saebench.forward import LMHead
from saebench.splice import sink_mask
from saebench.stats import sum_by_row
from saebench.tasks.losses import HeadInput


class PassSums:
    """Per-context sums for one encoder, filled batch by batch."""

    def __init__(self, d_latent: int | None):
        self.d_latent = d_latent
        self.rows: dict[str, list[Tensor]] = {k: [] for k in ("ce", "kl", "sse", "cos", "l0", "l1")}
        self.fired = torch.zeros(d_latent or 0, dtype=torch.float64)
        self._batch: dict[str, Tensor] = {}

    def start_batch(self, batch_size: int) -> None:
        self._batch = {k: torch.zeros(batch_size, dtype=torch.float64) for k in ("sse", "cos", "l0", "l1")}

    def on_chunk(self, seq_len: int, scored: Tensor):
        """Splice callback accumulating reconstruction and sparsity sums for scored rows."""

        def callback(acts: Tensor, codes: Codes, recon: Tensor, rows: Tensor) -> None:
            use = scored[rows.cpu()]
            x, xh = acts.float()[use.to(acts.device)], recon.float()[use.to(acts.device)]
            ctx_idx = (rows.cpu()[use] // seq_len)
            self._batch["sse"].index_add_(0, ctx_idx, ((x - xh) ** 2).sum(1).double().cpu())
            self._batch["cos"].index_add_(0, ctx_idx, torch.cosine_similarity(x, xh, dim=1).double().cpu())
            if self.d_latent:
                sub = (SparseCodes(codes.indices[use], codes.values[use], codes.d_latent)
                       if isinstance(codes, SparseCodes) else codes[use.to(codes.device)])
                l0, l1, fired = latent_stats(sub, self.d_latent)
                self._batch["l0"].index_add_(0, ctx_idx, l0.cpu())
                self._batch["l1"].index_add_(0, ctx_idx, l1.cpu())
                self.fired += fired.cpu()

        return callback

    def end_batch(self, ce: Tensor, kl: Tensor) -> None:
        self.rows["ce"].append(ce)
        self.rows["kl"].append(kl)
        for key, value in self._batch.items():
            self.rows[key].append(value)

    def merge(self, other: "PassSums") -> None:
        """Add a later batch's sums (saebench.tasks.context.merge_state)."""
        for key, rows in other.rows.items():
            self.rows[key].extend(rows)
        self.fired += other.fired

    def cat(self, key: str) -> Tensor:
        return torch.cat(self.rows[key]) if self.rows[key] else torch.zeros(0, dtype=torch.float64)


CLEAN_SUMS = ("ce", "n_pred", "n_act", "sum_x", "sum_sq")
"""Per-context sums of the clean pass."""
PASS_SUMS = ("ce", "kl", "sse", "cos", "l0", "l1")
"""Per-context sums of a spliced pass (PassSums rows)."""


DENSITY_CURVE = {"plot": "histogram", "x": "firing_frequency", "scale": "log10", "marks": [1e-3, 1e-2],
                 "note": "log10 of the fraction of scored tokens each latent fires on; never-active latents "
                         "counted above"}
"""How a record declares its latents' firing frequencies (saebench.plots draws them as a histogram, the
dense_1e-3 / dense_1e-2 thresholds marked)."""


def density_rows(fired: Tensor, tokens: float) -> list[dict]:
    """Details rows: each latent's firing frequency, fired / tokens, over the scored tokens.

    Args:
        fired: (d_latent,) tokens each latent was active on (PassSums.fired, merged over ranks).
        tokens: scored tokens (sinks excluded).
    """
    freq = (fired / max(tokens, 1.0)).tolist()
    return [{"curve": "density", "latent": i, "firing_frequency": f} for i, f in enumerate(freq)]


def mean_activation(acts: Tensor, tokens: Tensor, bos_id: int) -> Tensor:
    """(d_in,) float32 mean of the activations at non-sink positions, summed in float64."""
    use = ~sink_mask(tokens, bos_id)
    total = torch.zeros(acts.shape[-1], dtype=torch.float64)
    for start in range(0, len(acts), 64):
        total += acts[start:start + 64].double()[use[start:start + 64]].sum(0)
    return (total / max(int(use.sum()), 1)).float()


CHUNK_ROWS = 16
"""Predictions whose vocabulary-sized float32 work is done at once. Small enough to stay in the
CPU cache (3.7x faster than whole 8x127-token batches for a 49k vocabulary), and what keeps a 256k
vocabulary's memory flat: no (batch, positions, vocab) tensor is ever made, only (16, vocab) ones."""


def pass_losses(head: LMHead | None, clean: HeadInput, passes: dict[str, HeadInput],
                targets: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Per-prediction NLL of the clean pass, and each pass's NLL and KL(clean || pass), CHUNK_ROWS predictions
    at a time, the LM head applied to the final norm's output chunk by chunk.

    Args:
        head: the model's LM head (None: the passes are given as logits).
        clean, passes: (batch, T, ...) final-norm outputs or logits (saebench.tasks.losses.head_input); the last
            position predicts nothing and is skipped.
        targets: (batch, T-1) next tokens.
    Returns:
        (batch, T-1) float32 clean NLL, and per pass (NLL, KL), each (batch, T-1) float32.
    """
    targets = targets.to(clean[0].device)
    nll_clean = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    out = {key: (torch.empty_like(nll_clean), torch.empty_like(nll_clean)) for key in passes}
    for b, rows in _chunks(*targets.shape):
        lp_clean = _log_probs(head, clean, b, rows)
        tgt = targets[b, rows, None]
        nll_clean[b, rows] = -lp_clean.gather(-1, tgt).squeeze(-1)
        p_clean = lp_clean.exp()
        for key, src in passes.items():
            lp = _log_probs(head, src, b, rows)
            nll, kl = out[key]
            nll[b, rows] = -lp.gather(-1, tgt).squeeze(-1)
            kl[b, rows] = torch.linalg.vecdot(p_clean, lp_clean - lp)
    return nll_clean, out


def _log_probs(head: LMHead | None, src: HeadInput, b: int, rows: slice) -> Tensor:
    """(rows, vocab) float32 log-probabilities of one chunk of one pass."""
    tensor, normed = src
    logits = head.logits(tensor[b, rows]) if normed and head is not None else tensor[b, rows]
    return torch.log_softmax(logits, -1, dtype=torch.float32)


def _chunks(batch: int, n_pred: int):
    """(row, positions) pieces of CHUNK_ROWS predictions covering a (batch, n_pred) grid."""
    for b in range(batch):
        for start in range(0, n_pred, CHUNK_ROWS):
            yield b, slice(start, min(start + CHUNK_ROWS, n_pred))


def add_clean_sums(clean: dict[str, list[Tensor]], acts: Tensor, nll: Tensor, act_mask: Tensor,
                   pred_mask: Tensor) -> None:
    """Append one batch's per-context clean sums (CLEAN_SUMS) to `clean`."""
    x = acts.double().cpu()
    clean["ce"].append(sum_by_row(nll.cpu(), pred_mask))
    clean["n_pred"].append(pred_mask.double().sum(1))
    clean["n_act"].append(act_mask.double().sum(1))
    clean["sum_x"].append((x * act_mask[..., None]).sum(1))
    clean["sum_sq"].append(((x**2).sum(-1) * act_mask).sum(1))


def reference_tensors(state: dict, refs: dict[str, str], tokens: Tensor, acts: Tensor,
                       mean: Tensor) -> dict[str, Tensor]:
    """What the reference cache stores: the data, the clean pass, and the zero and mean passes' sums."""
    out = {"tokens": tokens, "acts": acts, "mean": mean}
    normed = torch.cat(state["normed"]) if state["normed"] else None
    if normed is not None and len(normed) == len(acts):  # prefix reuse may have stopped part way
        out["normed"] = normed
    out |= {f"clean.{k}": torch.cat(v) for k, v in state["clean"].items()}
    for key, name in refs.items():
        out |= {f"{name}.{k}": state["sums"][key].cat(k) for k in PASS_SUMS}
    return out


def restore_references(state: dict, stored: dict[str, Tensor], refs: dict[str, str]) -> None:
    """Put the cached clean, zero and mean sums into `state` (replacing any partial ones)."""
    state["clean"] = {k: [stored[f"clean.{k}"]] for k in CLEAN_SUMS}
    for key, name in refs.items():
        sums = PassSums(None)
        sums.rows = {k: [stored[f"{name}.{k}"]] for k in PASS_SUMS}
        state["sums"][key] = sums
    state["acts"], state["normed"] = [], []
