"""What the benchmark tasks' forward passes record per item: prompt CE, the hookpoint's MSE / L0 / ||x||
averaged over the prompt, and the latents active near its end (saebench.tasks.benchmark turns them into
results)."""

import torch
from torch import Tensor

from saebench.encoders.base import Codes, SparseCodes, dense
from saebench.splice import sink_mask

FEATURE_WINDOW = 32
"""A latent is active for a prompt if it fires anywhere in its last 32 positions (Anders & Bloom)."""


class PromptRecorder:
    """Collects per-item prompt CE, MSE / L0 / ||x|| at the hookpoint and active latents from forward
    passes whose rows are items.

    Before each forward pass, `set_rows` says which item each batch row holds and how many
    of its leading tokens are prompt; rows of an item already recorded are ignored (lm-eval may
    run one prompt several times, e.g. once per answer choice).
    """

    def __init__(self, n_items: int, bos_id: int, collect_features: bool):
        """
        Args:
            collect_features: the encoder has latents: keep its active latents and its L0.
        """
        self.bos_id, self.collect_features = bos_id, collect_features
        self.ce_sum = torch.zeros(n_items, dtype=torch.float64)
        self.ce_count = torch.zeros(n_items, dtype=torch.float64)
        self.recorded = torch.zeros(n_items, dtype=torch.bool)
        names = ("n_positions", "mse", "norm", *(("l0",) if collect_features else ()))
        self.at_hookpoint = {name: torch.zeros(n_items, dtype=torch.float64) for name in names}
        """ItemScores.at_hookpoint of the items recorded so far."""
        self._pairs: list[Tensor] = []
        self._batch_pairs: list[Tensor] = []
        self._batch_at_hookpoint: list[tuple[Tensor, dict[str, Tensor]]] = []
        self._rows: list[tuple[int, int] | None] = []
        self._seq = 0

    def set_rows(self, rows: list[tuple[int, int] | None], seq_len: int) -> None:
        """rows[b] = (item, prompt_len) for batch row b, or None to ignore it."""
        self._rows = [r if r is not None and not self.recorded[r[0]] else None for r in rows]
        self._seq = seq_len
        self._batch_pairs, self._batch_at_hookpoint = [], []

    def on_chunk(self, acts: Tensor, codes: Codes, recon: Tensor, rows: Tensor) -> None:
        """Splice callback: per-position MSE, ||x|| and L0 at prompt positions, and (item, latent) for latents
        firing in a prompt's last FEATURE_WINDOW positions."""
        rows = rows.cpu()
        b, pos = rows // self._seq, rows % self._seq
        item = torch.tensor([r[0] if r else -1 for r in self._rows], dtype=torch.long)[b]
        plen = torch.tensor([r[1] if r else 0 for r in self._rows], dtype=torch.long)[b]
        prompt = (item >= 0) & (pos < plen)
        if not prompt.any():
            return
        self._batch_at_hookpoint.append((rows[prompt], self._position_stats(acts, codes, recon, prompt)))
        use = prompt & (pos >= plen - FEATURE_WINDOW)
        if not self.collect_features or not use.any():
            return
        active = _active(codes, use.to(_codes_device(codes)))  # (m, 2): index into used rows, latent
        self._batch_pairs.append(torch.stack([item[use][active[:, 0]], active[:, 1]], 1))

    def _position_stats(self, acts: Tensor, codes: Codes, recon: Tensor, keep: Tensor) -> dict[str, Tensor]:
        """(m,) float64 MSE (mean over dimensions, as context_sweep), ||x|| and, with latents, L0 of the
        chunk's rows selected by `keep`."""
        sel = keep.to(acts.device)
        x, xh = acts[sel].float(), recon[sel].float()
        out = {"mse": ((x - xh) ** 2).sum(-1).double() / x.shape[-1], "norm": x.norm(dim=-1).double()}
        if self.collect_features:
            out["l0"] = _l0(codes, keep.to(_codes_device(codes))).double()
        return {k: v.cpu() for k, v in out.items()}

    def record_logits(self, token_ids: Tensor, logits: Tensor) -> None:
        """After the forward pass: prompt CE of each new item, and commit its latents."""
        sinks = sink_mask(token_ids.cpu(), self.bos_id)
        for b, row in enumerate(self._rows):
            if row is None:
                continue
            item, plen = row
            # predictions from position p of token p+1, inside the prompt; sinks neither predict nor are targets
            keep = ~sinks[b, 1:plen - 1] & ~sinks[b, 2:plen]
            logp = torch.log_softmax(logits[b, 1:plen - 1].float(), -1)
            nll = -logp.gather(-1, token_ids[b, 2:plen, None].to(logp.device)).squeeze(-1).cpu()
            self.ce_sum[item] = nll[keep].double().sum()
            self.ce_count[item] = keep.sum()
            self.recorded[item] = True
        self._commit_at_hookpoint(sinks)
        if self._batch_pairs:
            self._pairs.append(torch.cat(self._batch_pairs))
        self._batch_pairs = []

    def _commit_at_hookpoint(self, sinks: Tensor) -> None:
        """Each new item's means over its prompt's spliced positions, attention sinks left out (with
        --splice-bos they are spliced, but Anders & Bloom exclude BOS from every average)."""
        batch, seq = sinks.shape
        spliced = torch.zeros(batch * seq, dtype=torch.bool)
        values = {name: torch.zeros(batch * seq, dtype=torch.float64)
                  for name in self.at_hookpoint if name != "n_positions"}
        for rows, stats in self._batch_at_hookpoint:
            spliced[rows] = True
            for name, v in stats.items():
                values[name][rows] = v
        spliced = spliced.view(batch, seq) & ~sinks
        for b, row in enumerate(self._rows):
            if row is None:
                continue
            item, plen = row
            sel = spliced[b, :plen]
            n = int(sel.sum())
            self.at_hookpoint["n_positions"][item] = n
            for name, v in values.items():
                self.at_hookpoint[name][item] = v.view(batch, seq)[b, :plen][sel].sum() / n if n else 0.0
        self._batch_at_hookpoint = []

    def features(self) -> Tensor | None:
        """(pairs, 2) unique (item, latent) pairs, or None when features were not collected."""
        if not self.collect_features:
            return None
        if not self._pairs:
            return torch.zeros(0, 2, dtype=torch.long)
        return torch.unique(torch.cat(self._pairs), dim=0)


def _codes_device(codes: Codes) -> torch.device:
    return codes.values.device if isinstance(codes, SparseCodes) else codes.device


def _l0(codes: Codes, use: Tensor) -> Tensor:
    """(m,) active latents of each row selected by `use`."""
    if isinstance(codes, SparseCodes):
        return (codes.values[use] != 0).sum(1).cpu()
    return (dense(codes)[use] != 0).sum(1).cpu()


def _active(codes: Codes, use: Tensor) -> Tensor:
    """(m, 2) (row among `use`, latent) of nonzero codes in the rows selected by `use`."""
    if isinstance(codes, SparseCodes):
        values, indices = codes.values[use], codes.indices[use]
        nz = (values != 0).nonzero()
        return torch.stack([nz[:, 0], indices[nz[:, 0], nz[:, 1]]], 1).cpu()
    return (dense(codes)[use] != 0).nonzero().cpu()
