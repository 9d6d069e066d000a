"""What latent_recall and value_correlation share: the scored positions, the simulator's answers at them,
and the per-position scores (saebench.tasks.simulation holds the two tasks).

A task scores one position per context of the evaluation split: by default one drawn uniformly among the
non-sink positions from `min_position` on, so that the simulator always reads some text; with
``position=last``, the last token of each context, as EleutherAI's study of LLM-simulated encoders asks
about "the last token of a sequence" (it always selects "sequences with 32 tokens"). A context whose last
token is a sink (a document's BOS) is scored at its last non-sink token instead.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score
from torch import Tensor

from saebench.encoders.base import EncodeContext, Encoder
from saebench.encoders.llm_sim_options import check_candidates
from saebench.errors import SaebenchError
from saebench.tasks.base import PartialStore, Task, TaskContext, checkpointed_batches
from saebench.tasks.params import added_at_default, choice, whole

POSITIONS = ("random", "last")
THRESHOLDS = tuple(sorted({round(0.05 * i, 2) for i in range(21)} | {0.99, 0.999}))
"""P(active) thresholds of latent_recall's threshold curve: 0 to 1 by 0.05, and 0.99 and 0.999, where
EleutherAI's study reads its most confident predictions ("more than 99.9% confident")."""


@dataclass(frozen=True)
class ScoredConfig:
    """Where the simulated encoder is scored."""

    positions: int = 100
    """Scored positions, one per context (--limit overrides)."""
    context_len: int = 64
    """Tokens per context, BOS included (--context-len overrides)."""
    min_position: int = 8
    """First position that may be scored (the simulator reads up to 32 tokens before it)."""
    position: str = "random"
    """'random' (a uniformly drawn position from min_position on) or 'last' (each context's last token)."""
    candidates: str | None = None
    """Inactive candidates per position ('all' or a count); None: each encoder's own llm_sim option."""


class SimulatedPositionsTask(Task):
    """A task that scores an llm_sim encoder's answers at one position per context (ScoredConfig)."""

    def __init__(self, positions: int = ScoredConfig.positions, context_len: int = ScoredConfig.context_len,
                 min_position: int = ScoredConfig.min_position, position: str = ScoredConfig.position,
                 candidates: str | int | None = None):
        name = self.spec.name
        self.defaults = ScoredConfig(whole(name, "positions", positions, 1), whole(name, "context_len", context_len, 2),
                                     whole(name, "min_position", min_position, 1),
                                     choice(name, "position", position, POSITIONS),
                                     None if candidates is None else check_candidates(candidates, f"{name} parameter"))

    def settings(self, ctx: TaskContext) -> ScoredConfig:
        """Preset defaults overridden by the user's --limit / --context-len."""
        d = self.defaults
        return ScoredConfig(ctx.settings.limit or d.positions, ctx.settings.context_len or d.context_len,
                            d.min_position, d.position, d.candidates)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return added_at_default(asdict(self.settings(ctx)), {"position": "random", "candidates": None}) | {
            "corpus": ctx.settings.corpus.name, "split": ctx.settings.corpus.split}

    def candidates_of(self, ctx: TaskContext, enc: Encoder) -> str:
        """The inactive candidates per position `enc` is asked about in this run."""
        return self.settings(ctx).candidates or enc.cfg.candidates


@dataclass
class Scored:
    """The scored positions and their activations."""

    tokens: Tensor  # (n, context_len)
    positions: Tensor  # (n,)
    acts: Tensor  # (n, context_len, d_in) clean activations at the hookpoint

    def context(self) -> EncodeContext:
        rows = torch.arange(len(self.positions))
        return EncodeContext(self.tokens[rows, self.positions], self.positions, self.tokens, rows)

    def at_positions(self) -> Tensor:
        return self.acts[torch.arange(len(self.positions)), self.positions.to(self.acts.device)]


def pick_positions(keep: Tensor, position: str, seed: int) -> Tensor:
    """(n,) one scored position per row of `keep` (n, T), True where a position may be scored: the last such
    ('last'), or one drawn uniformly with `seed` ('random'); a row with none gets its last position."""
    n, length = keep.shape
    if position == "last":
        last = torch.where(keep, torch.arange(length).expand_as(keep), -1).max(1).values
        return torch.where(last >= 0, last, length - 1)
    gen = torch.Generator().manual_seed(seed)
    weights = keep.float() + 1e-12 * (keep.sum(1, keepdim=True) == 0)
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def scored_positions(ctx: TaskContext, cfg: ScoredConfig) -> Scored:
    """One non-sink position per context, as cfg.position says (drawn with the run's seed)."""
    if cfg.context_len <= cfg.min_position:
        raise SaebenchError(f"context_len {cfg.context_len} leaves no position at or after min_position {cfg.min_position}")
    tokens = ctx.text.contexts(cfg.positions * cfg.context_len, cfg.context_len)
    keep = ~ctx.keep_mask(tokens)
    keep[:, :cfg.min_position] = False
    positions = pick_positions(keep, cfg.position, ctx.settings.seed)
    state = {"acts": []}
    for sl, part in batches(ctx, len(tokens), state, f"activations {ctx.hook.name}", lambda: {"acts": []}):
        part["acts"].append(ctx.hook.capture(tokens[sl]).cpu())
    return Scored(tokens, positions, torch.cat(state["acts"]).to(ctx.model.device))


def batches(ctx: TaskContext, n: int, state: dict, desc: str, fresh) -> Iterator[tuple[slice, dict]]:
    """Batches of the run's batch size over `n` rows, split over the ranks of a data-parallel run and merged in
    order into `state`; not checkpointed (the LLM's answers are in its response cache)."""
    return checkpointed_batches(ctx.settings, PartialStore(None), n, state, desc, math.inf, fresh)


def simulated(ctx: TaskContext, enc: Encoder, data: Scored, values: str | None, candidates: str,
              value_prompt: str = "default") -> Any:
    """enc.simulate on every scored position, batch by batch (split over the ranks of a data-parallel run)."""
    x, context = data.at_positions(), data.context()
    state = {"sims": []}
    for sl, part in batches(ctx, len(x), state, f"simulating {enc.spec.label}", lambda: {"sims": []}):
        part["sims"].append(enc.simulate(x[sl], context[sl], values=values, candidates=candidates,
                                         value_prompt=value_prompt))
    return type(state["sims"][0]).concat(state["sims"])


def check_simulating(encoders: list[Encoder], task: str) -> None:
    for enc in encoders:
        if not hasattr(enc, "simulate"):
            raise SaebenchError(f"{task} scores encoders that predict latents from text (llm_sim:<sae spec>); "
                                f"{enc.spec.label!r} does not")


def mean_se_iqr(values: list[float | None]) -> tuple[float | None, float | None, int, list[float] | None]:
    """Mean, std/sqrt(n), n and the 25-75% range of the values that are not None or NaN."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return None, None, 0, None
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return float(v.mean()), se, len(v), [float(np.percentile(v, 25)), float(np.percentile(v, 75))]


def rates(y: np.ndarray, pred: np.ndarray, d_latent: int) -> dict[str, float | None]:
    """Recall, specificity and the predicted-active latents expected among all `d_latent` of one position's
    candidates (y true active, pred predicted active): |A| recall + (d_latent - |A|)(1 - specificity)."""
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    pos, neg = tp + fn, fp + tn
    recall = tp / pos if pos else None
    spec = tn / neg if neg else None
    expected = (pos * recall + (d_latent - pos) * (1 - spec)) if recall is not None and spec is not None else None
    return {"recall": recall, "specificity": spec, "expected_active": expected}


def classification(y: np.ndarray, pred: np.ndarray, p: np.ndarray, d_latent: int) -> dict[str, float | None]:
    """Scores of one position's candidates: y true active, pred predicted active, p P(active)."""
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    out = rates(y, pred, d_latent)
    recall, spec = out["recall"], out["specificity"]
    return out | {"precision": tp / (tp + fp) if tp + fp else None,
                  "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
                  "balanced_accuracy": (recall + spec) / 2 if recall is not None and spec is not None else None,
                  "auc": float(roc_auc_score(y, p)) if y.any() and not y.all() else None}


def threshold_curve(answers: list[tuple[np.ndarray, np.ndarray]], d_latent: int,
                    thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    """Details rows of the threshold curve (EleutherAI's Figure 5: accuracy on active and on inactive latents
    against the P(active) threshold, with the expected predicted-active count over the whole dictionary):
    at each threshold t, the mean over positions and its std/sqrt(n) of recall, specificity and
    expected_active with the candidates of P >= t predicted active.

    Args:
        answers: per position, (y, p): whether each answered candidate is truly active, and its P(active).
    """
    rows = []
    for t in thresholds:
        per = [rates(y, p >= t, d_latent) for y, p in answers]
        row: dict[str, Any] = {"curve": "threshold", "x": t}
        for k in ("recall", "specificity", "expected_active"):
            row[k], row[f"{k}_se"], _, _ = mean_se_iqr([r[k] for r in per])
        rows.append(row)
    return rows


def matched_cosine(W: Tensor, a: Tensor, b: Tensor) -> float | None:
    """Decoder-direction agreement of latent sets a and b: the cosines of the Hungarian-matched pairs of their
    decoder rows, summed and divided by the larger set's size, so a latent left unmatched (a set predicted too
    large or too small) counts 0, as unmatched sources do in the synthetic task's MCC; None if both are empty."""
    if len(a) == 0 and len(b) == 0:
        return None
    if len(a) == 0 or len(b) == 0:
        return 0.0
    Wn = torch.nn.functional.normalize(W.float(), dim=1)
    cos = (Wn[a] @ Wn[b].T).cpu().numpy()
    r, c = linear_sum_assignment(cos, maximize=True)
    return float(cos[r, c].sum() / max(len(a), len(b)))
