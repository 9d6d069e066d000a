"""Tasks: a frozen spec (name, version, metrics with direction) and run(ctx, encoders) -> results.

Tasks never write files; the runner does. One module per task, registered through the
``saebench.tasks`` entry-point group.
"""

from saebench.tasks.base import MetricSpec, PartialStore, Task, TaskContext, TaskResult, TaskSpec

__all__ = ["MetricSpec", "PartialStore", "Task", "TaskContext", "TaskResult", "TaskSpec"]
