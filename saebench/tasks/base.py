"""Task interface and the context the runner hands to a task.

A task's identity (TaskSpec, MetricSpec) is defined with the records that carry it (saebench.records), so
leaderboards read it without importing tasks; it is re-exported here for task plugins.
"""

import sys
import time
from collections.abc import Iterator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.checkpoints import PartialStore
from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import Encoder, EncoderSpec
from saebench.errors import SaebenchError
from saebench.records import MetricSpec, TaskSpec
from saebench.models import Hookpoint, LoadedModel
from saebench.forward import HookpointForward, hookpoint_forward
from saebench.splice import SpliceConfig, sink_mask


@dataclass
class TaskResult:
    """One encoder's result on one task."""

    metrics: dict[str, float | None]
    stderr: dict[str, float | None]
    n: dict[str, int | None]
    details: list[dict[str, Any]] | None = None
    """Per-item rows, saved as JSONL next to the record."""
    extra: dict[str, Any] = field(default_factory=dict)


def row_key(label: str, hookpoint: str) -> str:
    """Key of a result row: the encoder's label at its hookpoint ('sae:default@layers.5.resid_post')."""
    return f"{label}@{hookpoint}"


@dataclass(frozen=True)
class Row:
    """One record a task run writes: an encoder, or a combination of encoders, at its hookpoint(s)."""

    key: str
    """What run() keys this row's result by."""
    encoder: EncoderSpec
    hookpoint: str | None
    """A hookpoint name, or for a combination its hookpoints ('layers.{5,15,25}.resid_post'); None for a task
    without a model."""


@dataclass
class TaskContext:
    """The model, hookpoint, data and settings a task runs with."""

    model: LoadedModel | None
    """The language model; None for a task that needs none (Task.needs_model False)."""
    hookpoint: Hookpoint | None
    """The hookpoint of a single-hookpoint task; None for a multi-hookpoint task (see `at`) or without a model."""
    corpus: CorpusSpec
    seed: int
    batch_size: int
    splice: SpliceConfig
    limit: int | None
    """The user's --limit (tokens or items, in the task's own unit); None for the task default."""
    context_len: int | None
    """The user's --context-len; None for the task default."""
    partial: PartialStore = field(default_factory=lambda: PartialStore(None))
    progress: bool = True
    reuse_prefix: bool = True
    """Run the layers below the hookpoint once per batch and only the layers above it per encoder."""
    cache_references: bool = True
    """Store the reference passes (clean, zero, mean) in saebench's cache and reuse them."""
    warnings: list[str] = field(default_factory=list)
    """Warnings raised while the task ran; stored in each record's extra.warnings."""
    groups: dict[str, list[Encoder]] = field(default_factory=dict)
    """The run's encoders by hookpoint name (a single-hookpoint task sees its own hookpoint only)."""
    wanted: frozenset[str] | None = None
    """Keys of the rows the runner needs (the others have finished records); None: every row."""
    specs: tuple[str, ...] = ()
    """The encoder spec strings of a task without a model, which builds (and fits) them on its own data."""
    _forward: HookpointForward | None = None
    _contexts: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    _mean: Tensor | None = None

    def contexts(self, n_tokens: int, context_len: int) -> Tensor:
        """(n_contexts, context_len) evaluation contexts (cached per size)."""
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

    def at(self, hookpoint: str) -> "TaskContext":
        """This context at one hookpoint: its own forward passes and checkpoint store; the same data,
        settings and warnings."""
        return replace(self, hookpoint=self.model.hookpoint(hookpoint), partial=self.partial.sub(hookpoint),
                       groups={hookpoint: self.groups.get(hookpoint, [])}, _forward=None, _mean=None)

    def warn(self, message: str) -> None:
        """Print a warning now and keep it for the records of this run (extra.warnings)."""
        print(f"saebench: warning: {message}", file=sys.stderr)
        self.warnings.append(message)

    def keep_mask(self, tokens: Tensor) -> Tensor:
        """(batch, seq) positions passed through unspliced: sinks unless --splice-bos."""
        if self.splice.splice_bos:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return sink_mask(tokens, self.model.bos_id)

    @property
    def forward(self) -> HookpointForward:
        """Clean captures at the hookpoint and passes resumed from it (built on first use)."""
        if self.hookpoint is None:
            raise RuntimeError("a multi-hookpoint task has no single forward; use ctx.at(hookpoint).forward")
        if self._forward is None:
            self._forward = hookpoint_forward(self.model, self.hookpoint, self.reuse_prefix)
        return self._forward

    def capture(self, tokens: Tensor) -> Tensor:
        """(batch, seq, d_in) activations at the hookpoint; the layers above it are not run."""
        return self.forward.capture(tokens)

    def set_activation_mean(self, mean: Tensor) -> None:
        """Declare the (d_in,) mean activation over the task's evaluation tokens (sinks excluded)."""
        self._mean = mean

    def activation_mean(self) -> Tensor:
        """(d_in,) float32 mean activation over the evaluation tokens, sinks excluded."""
        if self._mean is None:
            raise SaebenchError("the 'mean' encoder needs a mean activation over the task's evaluation tokens, "
                                "which this task does not measure; use it with ce_kl")
        return self._mean


def checked_length(ctx: TaskContext, length: int) -> int:
    """`length` (--max-len) if the model can take sequences that long; else one clear error."""
    limit = ctx.model.max_positions
    if length < 2:
        raise SaebenchError(f"--max-len must be at least 2, not {length}")
    if limit and length > limit:
        raise SaebenchError(f"--max-len {length} is longer than model {ctx.model.name!r} supports ({limit} positions)")
    return length


def checkpointed_batches(ctx: TaskContext, n_items: int, state: dict, desc: str, seconds: float,
                         store: PartialStore | None = None) -> Iterator[slice]:
    """Batches of ctx.batch_size over `n_items`, with a progress bar, resuming after the state["done"]
    batches an interrupted run finished, and saving `state` to `store` (default ctx.partial) at most
    every `seconds` once the caller has added a batch to it."""
    store = store or ctx.partial
    starts = range(0, n_items, ctx.batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", disable=not ctx.progress, initial=state["done"])
    last_save = time.monotonic()
    for i, start in enumerate(starts):
        if i < state["done"]:
            continue
        yield slice(start, start + ctx.batch_size)
        state["done"] = i + 1
        bar.update()
        if time.monotonic() - last_save > seconds:
            store.save(state)
            last_save = time.monotonic()
    bar.close()


class Task(ABC):
    """A benchmark that scores encoders spliced into a model.

    A single-hookpoint task (the default) is run once per hookpoint of the run, with that
    hookpoint's encoders, and keys its results by encoder label. A task that needs encoders at
    several hookpoints at once (a sweep over layers, errors propagating from layer i to layer j,
    layers spliced together) sets `multi_hookpoint`: it is run once with every encoder,
    ctx.groups maps each hookpoint to its encoders, ctx.at(name) gives the context of one
    hookpoint, and results are keyed by `Row.key`. Either kind may add rows of its own (e.g.
    a combination of encoders) by overriding `rows`.

    A task that needs no language model (synthetic data) sets `needs_model` False: the runner loads
    no model and builds no encoder for it; ctx.specs holds the encoder spec strings, the task builds
    each one on its own data (BuildContext(None, ..., width=..., training=...).build(spec)), overrides
    `rows` (one per spec, hookpoint None) and keys its results by `Row.key`.
    """

    spec: ClassVar[TaskSpec]
    multi_hookpoint: ClassVar[bool] = False
    """True: run() gets every encoder of the run at once, grouped by hookpoint (ctx.groups)."""
    needs_model: ClassVar[bool] = True
    """False: the task runs without a language model; its records have no model and no hookpoint."""

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Task":
        """Build from preset parameters (tasks/*.yaml)."""
        return cls(**params)

    @abstractmethod
    def config(self, ctx: TaskContext) -> dict[str, Any]:
        """The task's effective parameters for this run (hashed into records)."""

    def check_specs(self, specs: list[str]) -> None:
        """Reject encoder specs a task without a model cannot run, before any task runs (default: accept all)."""

    def rows(self, ctx: TaskContext) -> list[Row]:
        """The records this run writes: one per encoder at its hookpoint (tasks may add combinations)."""
        return [Row(row_key(e.spec.label, hp), e.spec, hp) for hp, group in ctx.groups.items() for e in group]

    @abstractmethod
    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        """Score every encoder on the same data.

        Returns:
            Results keyed by encoder label (single-hookpoint tasks) or by Row.key (multi-hookpoint
            tasks, which compute at least the rows in ctx.wanted).
        """
