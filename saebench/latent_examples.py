"""A latent's examples as the automatic-interpretation protocol draws them (Paulo et al., "Automatically
Interpreting Millions of Features in Large Language Models", 001 in the sources; EleutherAI's delphi).

The sample's contexts are cut into non-overlapping 32-token windows (delphi's ``example_ctx_len``). A window
is *activating* for a latent when the latent fires anywhere in it; activating windows are ordered by their
largest activation, strongest first, and cut into ten equal quantiles (quantile 0 the strongest tenth, as
delphi numbers them; the remainder of an uneven split is left out, as delphi leaves it). *Non-activating*
windows are drawn at random among the windows where the latent never fires (delphi's ``random`` source).

What the explainer sees and what a scorer is tested on come from different text: explainers read the
corpus's training split, scorers the held-out evaluation split (saebench.tasks.autointerp), so no scored
example was ever shown to the explainer. delphi draws both from one pool; this is saebench's stricter split.
"""

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saebench.capture import LatentSample
from saebench.errors import SaebenchError

WINDOW = 32
"""Tokens per example (001: "32 tokens, irrespective of the position of the activating tokens")."""
N_QUANTILES = 10
SAMPLINGS = ("quantiles", "top", "random")
"""How an explainer's examples are drawn: ten per-quantile random draws, the strongest, or uniformly."""
HIGHLIGHT = 0.3
"""Tokens at or above this fraction of an example's largest activation are highlighted (delphi's threshold)."""


@dataclass
class Example:
    """One window of text and a latent's activations on it."""

    window: int
    """Window index in the sample (context * windows per context + window within it)."""
    tokens: list[int]
    activations: list[float]
    quantile: int
    """Quantile of an activating example (0: the strongest tenth); -1 for a non-activating one (delphi's distance)."""
    str_tokens: list[str] = field(default_factory=list)

    @property
    def activating(self) -> bool:
        return self.quantile >= 0

    @property
    def decile(self) -> int:
        """1 (weakest tenth) to 10 (strongest) for an activating example, 0 for a non-activating one."""
        return N_QUANTILES - self.quantile if self.activating else 0

    def text(self) -> str:
        return "".join(self.str_tokens)

    def highlighted(self, marks: set[int] | None = None) -> str:
        """The text with runs of marked tokens in <<...>>; by default the tokens at or above HIGHLIGHT of the
        example's largest activation."""
        if marks is None:
            top = max(self.activations) if self.activations else 0.0
            marks = {i for i, a in enumerate(self.activations) if top > 0 and a >= HIGHLIGHT * top}
        out = []
        for i, piece in enumerate(self.str_tokens):
            if i in marks and i - 1 not in marks:
                out.append("<<")
            out.append(piece)
            if i in marks and i + 1 not in marks:
                out.append(">>")
        return "".join(out)


class LatentWindows:
    """Every latent's activating windows in a sample, strongest first, and its windows without activation."""

    def __init__(self, sample: LatentSample, tokenizer, window: int = WINDOW):
        n_ctx, length = sample.tokens.shape
        if length % window:
            raise SaebenchError(f"latent sample contexts of {length} tokens cannot be cut into {window}-token windows")
        self.sample, self.tokenizer, self.window = sample, tokenizer, window
        self.windows = sample.tokens.reshape(-1, window)
        self._pieces: dict[int, str] = {}

    @property
    def n_windows(self) -> int:
        return self.windows.shape[0]

    def activations(self, latent: int) -> tuple[Tensor, Tensor]:
        """(window ids strongest first, (n, window) activations) of `latent`'s activating windows."""
        rows, values = self.sample.of(latent)
        ids, inverse = torch.unique(rows // self.window, return_inverse=True)
        acts = torch.zeros(len(ids), self.window)
        acts[inverse, rows % self.window] = values.float()
        order = torch.argsort(acts.max(dim=1).values, descending=True, stable=True)
        return ids[order], acts[order]

    def n_activating(self, latent: int) -> int:
        rows, _ = self.sample.of(latent)
        return len(torch.unique(rows // self.window))

    def quantiles(self, latent: int) -> list[list[Example]]:
        """The activating examples in ten equal quantiles, strongest first (delphi's split_quantiles)."""
        ids, acts = self.activations(latent)
        size = len(ids) // N_QUANTILES
        return [[self.example(int(ids[j]), acts[j], q) for j in range(q * size, (q + 1) * size)]
                for q in range(N_QUANTILES)]

    def non_activating(self, latent: int, n: int, seed: int) -> list[Example]:
        """`n` windows drawn at random (without replacement) among those where `latent` never fires."""
        rows, _ = self.sample.of(latent)
        free = torch.ones(self.n_windows, dtype=torch.bool)
        free[rows // self.window] = False
        pool = free.nonzero().squeeze(1)
        if len(pool) < n:
            return []
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 1_000_003 + latent))[:n]
        return [self.example(int(w), torch.zeros(self.window), -1) for w in pool[pick].sort().values]

    def example(self, window: int, acts: Tensor, quantile: int) -> Example:
        tokens = self.windows[window].tolist()
        return Example(window, tokens, [round(float(a), 6) for a in acts], quantile, [self.piece(t) for t in tokens])

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]


def draw(quantiles: list[list[Example]], n: int, sampling: str, seed: int) -> list[Example]:
    """`n` activating examples (delphi's samplers): 'quantiles' draws n // 10 at random from each quantile,
    'top' takes the n strongest, 'random' n uniformly; fewer when there are fewer."""
    rng = random.Random(seed)
    if sampling == "top":
        return [e for q in quantiles for e in q][:n]
    if sampling == "random":
        pool = [e for q in quantiles for e in q]
        return sorted(rng.sample(pool, min(n, len(pool))), key=lambda e: e.quantile)
    if sampling == "quantiles":
        per = n // len(quantiles)
        return [e for q in quantiles for e in (q if len(q) <= per else rng.sample(q, per))]
    raise SaebenchError(f"example sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
