"""Task interface. The context the runner hands a task is in saebench.tasks.context and re-exported here.

A task's identity (TaskSpec, MetricSpec) is defined with the records that carry it (saebench.records), so
leaderboards read it without importing tasks; it is re-exported here for task plugins.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from saebench.checkpoints import PartialStore
from saebench.encoders.base import Encoder, EncoderSpec
from saebench.records import MetricSpec, TaskSpec
from saebench.tasks.context import (
    EvalText,
    HookpointRun,
    RunSettings,
    TaskContext,
    checked_length,
    checkpointed_batches,
    merge_state,
)

__all__ = ["EvalText", "HookpointRun", "MetricSpec", "PartialStore", "Row", "RunSettings", "Task", "TaskContext",
           "TaskResult", "TaskSpec", "checked_length", "checkpointed_batches", "merge_state", "row_key"]


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
