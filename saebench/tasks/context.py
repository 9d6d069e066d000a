"""What the runner hands a task, in four small pieces that each say what they hold.

- `RunSettings`: how the user asked the run to go (seed, batch size, --limit, --context-len, corpus,
  splice and speed switches); the same for every task and hookpoint of the run.
- `EvalText`: the evaluation text, token contexts drawn once per size from the corpus's held-out split,
  and the warnings raised while drawing or scoring them (kept in the records).
- `HookpointRun`: one hookpoint of the model: clean captures there and passes resumed from it
  (saebench.forward), and the mean activation encoders may ask for.
- `PartialStore` (saebench.checkpoints): the checkpoint store an interrupted run resumes from.

`TaskContext` holds them with the encoders to run; a task's helpers take the piece they use.
"""

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench import distributed
from saebench.checkpoints import PartialStore
from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import Encoder
from saebench.errors import SaebenchError
from saebench.forward import HookpointForward, hookpoint_forward
from saebench.models import Hookpoint, LoadedModel
from saebench.splice import SpliceConfig, sink_mask


@dataclass(frozen=True)
class RunSettings:
    """How the user asked the run to go (`saebench run`'s options)."""

    seed: int = 0
    """Which held-out contexts are drawn (--seed)."""
    batch_size: int = 8
    """Contexts or items per forward pass (--batch-size)."""
    limit: int | None = None
    """The user's --limit (tokens, items or samples, in the task's own unit); None for the task default."""
    context_len: int | None = None
    """The user's --context-len; None for the task default."""
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    """The evaluation text's corpus (its held-out split)."""
    splice: SpliceConfig = field(default_factory=SpliceConfig)
    progress: bool = True
    """Show progress bars."""
    reuse_prefix: bool = True
    """Run the layers below the hookpoint once per batch and only the layers above it per encoder."""
    cache_references: bool = True
    """Store the reference passes (clean, zero, mean) in saebench's cache and reuse them."""


class EvalText:
    """The evaluation text: token contexts from the corpus's held-out split (drawn once per size), and the
    warnings raised while the task runs (stored in each record's extra.warnings)."""

    def __init__(self, model: LoadedModel, settings: RunSettings):
        self.model, self.corpus, self.seed = model, settings.corpus, settings.seed
        self.warnings: list[str] = []
        self._contexts: dict[tuple[int, int], Tensor] = {}

    def contexts(self, n_tokens: int, context_len: int) -> Tensor:
        """(n_contexts, context_len) evaluation contexts, each starting with BOS (cached per size)."""
        key = (n_tokens, context_len)
        if key not in self._contexts:
            tokens = token_contexts(self.model.tokenizer, self.corpus, context_len, n_tokens, self.seed,
                                    self.model.bos_id)
            if tokens.numel() < n_tokens:
                self.warn(f"the {self.corpus.split} split of corpus {self.corpus.name!r} holds {tokens.numel()} "
                          f"tokens in {context_len}-token contexts, fewer than the {n_tokens} asked for; "
                          "evaluating all of them")
            self._contexts[key] = tokens
        return self._contexts[key]

    def warn(self, message: str) -> None:
        """Print a warning now and keep it for the records of this run (extra.warnings)."""
        if distributed.is_main():  # every rank meets it; one says it
            print(f"saebench: warning: {message}", file=sys.stderr)
        self.warnings.append(message)


class HookpointRun:
    """One hookpoint of the model: captures and resumed passes there, and the mean activation encoders may ask
    for."""

    def __init__(self, model: LoadedModel, hookpoint: Hookpoint, settings: RunSettings):
        self.model, self.hookpoint, self.splice = model, hookpoint, settings.splice
        self._reuse_prefix = settings.reuse_prefix
        self._forward: HookpointForward | None = None
        self._mean: Tensor | None = None

    @property
    def name(self) -> str:
        return self.hookpoint.name

    @property
    def forward(self) -> HookpointForward:
        """Clean captures at the hookpoint and passes resumed from it (built on first use)."""
        if self._forward is None:
            self._forward = hookpoint_forward(self.model, self.hookpoint, self._reuse_prefix)
        return self._forward

    def capture(self, tokens: Tensor) -> Tensor:
        """(batch, seq, d_in) activations at the hookpoint; the layers above it are not run."""
        return self.forward.capture(tokens)

    def set_activation_mean(self, mean: Tensor) -> None:
        """Declare the (d_in,) mean activation over the task's evaluation tokens (sinks excluded)."""
        self._mean = mean

    def activation_mean(self) -> Tensor:
        """(d_in,) float32 mean activation over the evaluation tokens, sinks excluded (Encoder.prepare's
        EvalData)."""
        if self._mean is None:
            raise SaebenchError("the 'mean' encoder needs a mean activation over the task's evaluation tokens, "
                                "which this task does not measure; use it with ce_kl")
        return self._mean


@dataclass
class TaskContext:
    """The settings, model, evaluation text, hookpoint, checkpoint store and encoders a task runs with."""

    settings: RunSettings
    model: LoadedModel | None
    """The language model; None for a task that needs none (Task.needs_model False)."""
    text: EvalText | None
    """The evaluation text; None without a model."""
    hook: HookpointRun | None
    """The hookpoint of a single-hookpoint task; None for a multi-hookpoint task (see `at`) or without a model."""
    store: PartialStore = field(default_factory=lambda: PartialStore(None))
    """Where in-progress state is saved, so an interrupted run resumes."""
    groups: dict[str, list[Encoder]] = field(default_factory=dict)
    """The run's encoders by hookpoint name (a single-hookpoint task sees its own hookpoint only)."""
    wanted: frozenset[str] | None = None
    """Keys of the rows the runner needs (the others have finished records); None: every row."""
    specs: tuple[str, ...] = ()
    """The encoder spec strings of a task without a model, which builds (and fits) them on its own data."""

    @classmethod
    def create(cls, model: LoadedModel | None, hookpoint: str | None, settings: RunSettings, **rest) -> "TaskContext":
        """A context on `model` (None: a task without a model), at `hookpoint` for a single-hookpoint task."""
        text = EvalText(model, settings) if model is not None else None
        hook = HookpointRun(model, model.hookpoint(hookpoint), settings) if model is not None and hookpoint else None
        return cls(settings, model, text, hook, **rest)

    def at(self, hookpoint: str) -> "TaskContext":
        """This context at one hookpoint: its own forward passes and checkpoint store; the same text, settings and
        warnings."""
        return replace(self, hook=HookpointRun(self.model, self.model.hookpoint(hookpoint), self.settings),
                       store=self.store.sub(hookpoint), groups={hookpoint: self.groups.get(hookpoint, [])})

    def keep_mask(self, tokens: Tensor) -> Tensor:
        """(batch, seq) positions passed through unspliced and unencoded, at every hookpoint: attention sinks
        (position 0 and BOS) unless --splice-bos."""
        if self.settings.splice.splice_bos:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return sink_mask(tokens, self.model.bos_id)

    @property
    def warnings(self) -> list[str]:
        """Warnings raised while the task ran (the evaluation text's)."""
        return self.text.warnings if self.text is not None else []


def checked_length(model: LoadedModel, length: int) -> int:
    """`length` (--max-len) if the model can take sequences that long; else one clear error."""
    limit = model.max_positions
    if length < 2:
        raise SaebenchError(f"--max-len must be at least 2, not {length}")
    if limit and length > limit:
        raise SaebenchError(f"--max-len {length} is longer than model {model.name!r} supports ({limit} positions)")
    return length


def checkpointed_batches(settings: RunSettings, store: PartialStore, n_items: int, state: dict, desc: str,
                         seconds: float, fresh: Callable[[], dict], counter: str = "done") -> Iterator[tuple[slice, dict]]:
    """Batches of settings.batch_size over `n_items`, each with an empty `part` (made by `fresh`) for the task to
    fill with that batch's sums; the parts are merged into `state` in batch order (`merge_state`).

    A run resumes after the state[counter] batches an interrupted run merged, and `state` is saved to `store` at
    most every `seconds`. In a data-parallel run (saebench.distributed) the ranks take the remaining batches in
    rounds, one batch each, and after each round every rank merges every rank's part in batch order: each rank
    ends with the state one process would have, bitwise, and rank 0 alone saves it and shows the progress bar.
    """
    n_batches = -(-n_items // settings.batch_size)
    size, me = distributed.world_size(), distributed.rank()
    done = state.setdefault(counter, 0)
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not settings.progress or not distributed.is_main(),
               initial=done)
    last_save = time.monotonic()
    for first in range(done, n_batches, size):
        index, part = first + me, None
        if index < n_batches:
            part = fresh()
            yield slice(index * settings.batch_size, (index + 1) * settings.batch_size), part
        for other in distributed.gather(part):  # rank order is batch order within a round
            if other is not None:
                merge_state(state, other)
        state[counter] = min(first + size, n_batches)
        bar.update(state[counter] - first)
        if time.monotonic() - last_save > seconds:
            store.save(state)
            last_save = time.monotonic()
    bar.close()


def merge_state(state: dict, part: dict) -> None:
    """Add one batch's sums (`part`, shaped like `state`) to `state`: lists are extended, tensors and numbers
    added, dicts merged key by key, and other objects merged by their own `merge` method."""
    for key, value in part.items():
        have = state[key]
        if isinstance(value, dict):
            merge_state(have, value)
        elif isinstance(value, list):
            have.extend(value)
        elif isinstance(value, Tensor):
            have.add_(value.to(have.device))
        elif isinstance(value, (int, float)):
            state[key] = have + value
        else:
            have.merge(value)
