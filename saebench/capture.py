"""Capture: run a model to its hookpoints over a corpus and keep what comes out.

One module for every "run the model over text and collect" job, below the tasks and encoders that
use it: training sets (the activations an encoder learns from) and latent samples (how an encoder's
latents fire on a sample of text, for explainers and simulators). Both follow the run's corpus,
batch size and device (the model's), and both say in their `key` which corpus they came from. Neither
builds a task context: they call the hookpoint's forward directly.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.checkpoints import save_atomic
from saebench.codes import Codec, EncodeContext, dense
from saebench.corpus import CorpusSpec, token_contexts
from saebench.forward import hookpoint_forward
from saebench.models import Hookpoint, LoadedModel
from saebench.records import config_hash
from saebench.splice import sink_mask

DEFAULT_CORPUS = CorpusSpec().name
"""The embedded text, which caches were keyed without naming; any other corpus is named in a key."""
SAMPLE_VERSION = 1
"""Bumped when latent_sample's computation changes (cached samples are then recomputed)."""


def collect_activations(model: LoadedModel, hookpoint: Hookpoint, tokens: Tensor, batch_size: int,
                        progress: bool = True, desc: str = "collecting activations") -> Tensor:
    """(n, d_model) float32 activations at `hookpoint` of every non-sink token of `tokens` (n_contexts, seq),
    `batch_size` contexts per forward pass, on the model's device; the layers above the hookpoint are not run."""
    forward = hookpoint_forward(model, hookpoint)
    chunks = []
    for start in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = tokens[start:start + batch_size]
        acts = forward.capture(batch).float().cpu()
        chunks.append(acts[~sink_mask(batch, model.bos_id)])
    return torch.cat(chunks)


class TrainingSet(ABC):
    """Activations an encoder may learn from, and what identifies them (hashed into cached fits)."""

    key: dict[str, Any]
    """What the activations are (model, hookpoint, corpus split, count, ... or a synthetic config)."""
    codes: Tensor | None = None
    """(n, d_latent) true codes of the activations, when a task knows them (synthetic, known-codes regime):
    encoders that learn then regress them, and fit their dictionary to them by least squares."""

    device: str = "cpu"
    """Where an encoder fits on these activations: the model's device (a GPU where the run has one)."""

    @abstractmethod
    def activations(self) -> Tensor:
        """(n, d_in) float32 training activations (computed once, then kept)."""

    def on_device(self) -> Tensor:
        """The activations on `device`, where fits run."""
        return self.activations().to(self.device)


class TensorTrainingSet(TrainingSet):
    """Training activations already in memory (a task's synthetic data)."""

    def __init__(self, acts: Tensor, key: dict[str, Any], codes: Tensor | None = None):
        self._acts, self.key, self.codes = acts.float(), key, codes
        self.device = str(acts.device)

    def activations(self) -> Tensor:
        return self._acts


class CorpusTrainingSet(TrainingSet):
    """Activations at a hookpoint over the training split of the run's corpus (never its evaluation split),
    sinks and sink-sized outliers left out; collected once per process."""

    def __init__(self, model: LoadedModel, hookpoint: str, corpus: str, tokens: int, context_len: int, seed: int,
                 outlier_factor: float, batch_size: int, progress: bool):
        self.model, self.hookpoint = model, model.hookpoint(hookpoint)
        self.corpus = CorpusSpec(corpus, "train")
        self.tokens, self.context_len, self.seed, self.outlier_factor = tokens, context_len, seed, outlier_factor
        self.batch_size, self.progress = batch_size, progress
        self.device = str(model.device)
        self.key = {"model": model.model_id, "revision": model.revision, "dtype": model.dtype,
                    "hookpoint": self.hookpoint.name, "corpus": f"{corpus}:train", "tokens": tokens,
                    "context_len": context_len, "seed": seed, "outlier_factor": outlier_factor}
        self._acts: Tensor | None = None

    def activations(self) -> Tensor:
        if self._acts is None:
            tokens = token_contexts(self.model.tokenizer, self.corpus, self.context_len,
                                    self.tokens * self.context_len // (self.context_len - 1), self.seed,
                                    self.model.bos_id)
            acts = collect_activations(self.model, self.hookpoint, tokens, self.batch_size, self.progress)
            # Besides position 0 and BOS, a few dozen tokens per 200k carry sink-sized norms (up to
            # ~27,000 vs a median ~170 at layer 15); left in, they dominate the MSE and an encoder learns
            # them instead of the ordinary tokens. They are still spliced and scored at evaluation.
            norms = acts.norm(dim=1)
            self._acts = acts[norms <= self.outlier_factor * norms.median()]
        return self._acts


_TRAINING_SETS: dict[tuple, CorpusTrainingSet] = {}


def default_hookpoint_name(model: LoadedModel, hookpoint: str | None) -> str:
    """`hookpoint` canonicalised, else the model preset's, else the middle layer's resid_post."""
    return model.hookpoint(hookpoint or model.default_hookpoint or f"layers.{len(model.layers()) // 2}.resid_post").name


def corpus_training_set(model: LoadedModel, hookpoint: str | None, corpus: str = DEFAULT_CORPUS,
                        batch_size: int = 16, progress: bool = True, tokens: int = 200_000, context_len: int = 128,
                        seed: int = 0, outlier_factor: float = 10.0) -> CorpusTrainingSet:
    """The training activations at `hookpoint` (default: the model preset's) over `corpus`'s training split,
    shared by every encoder of the process that trains there (the defaults are the default SAE's)."""
    name = default_hookpoint_name(model, hookpoint)
    key = (id(model), name, corpus, tokens, context_len, seed, outlier_factor)
    if key not in _TRAINING_SETS:
        _TRAINING_SETS[key] = CorpusTrainingSet(model, name, corpus, tokens, context_len, seed, outlier_factor,
                                                batch_size, progress)
    return _TRAINING_SETS[key]


@dataclass
class LatentSample:
    """How each latent fires on a sample of the training split (sinks left out).

    Activations are stored per latent, largest first: latent l's are ``rows[offsets[l]:offsets[l+1]]``
    (flat indices into `tokens`) and ``values[...]``.
    """

    tokens: Tensor
    """(n_contexts, context_len) token ids of the sample."""
    rows: Tensor
    """(n_active,) int64 flat token index of each (token, latent) activation, grouped by latent."""
    values: Tensor
    """(n_active,) float32 activation values, descending within each latent."""
    offsets: Tensor
    """(d_latent + 1,) int64 start of each latent's activations."""
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def d_latent(self) -> int:
        return len(self.offsets) - 1

    def of(self, latent: int) -> tuple[Tensor, Tensor]:
        """(rows, values) of `latent`'s activations, largest first."""
        a, b = int(self.offsets[latent]), int(self.offsets[latent + 1])
        return self.rows[a:b], self.values[a:b]

    def count(self) -> Tensor:
        """(d_latent,) activations per latent in the sample."""
        return self.offsets[1:] - self.offsets[:-1]

    def positions(self, bos_id: int) -> int:
        """How many of the sample's positions could fire: the tokens less the attention sinks left out."""
        return int((~sink_mask(self.tokens, bos_id)).sum())

    def max_value(self) -> Tensor:
        """(d_latent,) largest activation of each latent (0 for latents never active)."""
        first = self.values[self.offsets[:-1].clamp(max=max(len(self.values) - 1, 0))] if len(self.values) else \
            torch.zeros(self.d_latent)
        return torch.where(self.count() > 0, first, torch.zeros_like(first))

    def bin_of(self, latent: int, value: float) -> int:
        """Activation bin 0-9: floor(10 * value / the latent's max), as explainers normalise activations
        (Bills et al. 2023); values above the sample's max fall in bin 9."""
        _, vals = self.of(latent)  # largest first
        top = float(vals[0]) if len(vals) else 0.0
        return 0 if top <= 0 else min(9, max(0, int(10 * value / top)))

    def quantile_of(self, latent: int, value: float) -> float:
        """Share of the latent's activations in the sample that are <= `value` (its empirical CDF)."""
        _, vals = self.of(latent)
        if len(vals) == 0:
            return float("nan")
        asc = vals.flip(0)
        return float(torch.searchsorted(asc, torch.tensor([value], dtype=asc.dtype), right=True)[0]) / len(vals)

    def value_at(self, latent: int, q: float) -> float:
        """The latent's activation at quantile q in [0, 1] of its sample activations (0 if never active)."""
        _, vals = self.of(latent)
        if len(vals) == 0:
            return 0.0
        return float(torch.quantile(vals.float(), min(max(q, 0.0), 1.0)))


def latent_sample(model: LoadedModel, encoder: Codec, hookpoint: Hookpoint, cache_dir: Path | None,
                  corpus: str = DEFAULT_CORPUS, batch_size: int = 16, tokens: int = 65_536, context_len: int = 128,
                  seed: int = 0, progress: bool = True, split: str = "train") -> LatentSample:
    """`encoder`'s activations on `tokens` tokens of `corpus`'s `split` ('train', where explainers look;
    'eval', held out for scoring) at `hookpoint`, cached by what they are (the corpus and the split are named
    in the key unless they are the defaults)."""
    key = {"encoder": encoder.spec.to_dict(), "model": model.model_id, "revision": model.revision,
           "dtype": model.dtype, "hookpoint": hookpoint.name, "tokens": tokens, "context_len": context_len,
           "seed": seed, "version": SAMPLE_VERSION}
    if corpus != DEFAULT_CORPUS:
        key["corpus"] = corpus
    if split != "train":
        key["split"] = split
    path = None if cache_dir is None else cache_dir / "latent_samples" / f"{config_hash(key)}.pt"
    if path is not None and path.exists():
        try:
            return LatentSample(**torch.load(path, weights_only=True), key=key)
        except Exception:  # a corrupt cache entry costs a recomputation, nothing more
            pass
    ids = token_contexts(model.tokenizer, CorpusSpec(corpus, split), context_len, tokens, seed, model.bos_id)
    forward = hookpoint_forward(model, hookpoint)
    rows, latents, values = [], [], []
    for start in tqdm(range(0, len(ids), batch_size), desc="latent sample", unit="batch", disable=not progress):
        batch = ids[start:start + batch_size]
        acts = forward.capture(batch)
        flat_rows = (~sink_mask(batch, model.bos_id)).reshape(-1).nonzero().squeeze(1)
        x = acts.reshape(-1, acts.shape[-1])[flat_rows.to(acts.device)]
        pos = flat_rows % context_len
        with torch.no_grad():
            codes = dense(encoder.encode(x, EncodeContext(batch.reshape(-1)[flat_rows], pos))).float().cpu()
        r, l = codes.nonzero(as_tuple=True)
        rows.append(flat_rows[r] + start * context_len)
        latents.append(l)
        values.append(codes[r, l])
    rows_t, lat_t, val_t = torch.cat(rows), torch.cat(latents), torch.cat(values)
    order = torch.argsort(val_t, descending=True, stable=True)
    order = order[torch.argsort(lat_t[order], stable=True)]
    d = encoder.spec.d_latent
    offsets = torch.zeros(d + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(lat_t, minlength=d).cumsum(0)
    state = {"tokens": ids, "rows": rows_t[order], "values": val_t[order], "offsets": offsets}
    if path is not None:
        save_atomic(path, state)
    return LatentSample(**state, key=key)
