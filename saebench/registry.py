"""Plugin lookup through the entry-point groups `saebench.encoders` and `saebench.tasks`.

Built-in encoders and tasks are declared in pyproject.toml through the same groups third
parties use, so there is exactly one way in. Entry points resolve lazily: a broken plugin
only fails when it is asked for.
"""

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from saebench.errors import SaebenchError, did_you_mean

ENCODER_GROUP = "saebench.encoders"
TASK_GROUP = "saebench.tasks"


def available(group: str) -> dict[str, EntryPoint]:
    """All entry points of `group`, by name."""
    return {ep.name: ep for ep in entry_points(group=group)}


def load_plugin(group: str, name: str) -> Any:
    """Load the object registered as `name` in `group`; unknown names get a 'did you mean'."""
    eps = available(group)
    if name not in eps:
        kind = kind_of(group)
        raise SaebenchError(
            f"unknown {kind} {name!r}{did_you_mean(name, eps)}; `saebench list {kind}s` shows them all"
        )
    try:
        return eps[name].load()
    except Exception as exc:  # a third-party plugin that fails to import
        raise SaebenchError(f"{kind_of(group)} plugin {name!r} ({eps[name].value}) failed to load: {exc}") from exc


def kind_of(group: str) -> str:
    """'encoder' for saebench.encoders, 'task' for saebench.tasks."""
    return group.rsplit(".", 1)[-1].rstrip("s")


def distribution_of(group: str, name: str) -> dict[str, str | None]:
    """Name and version of the distribution that declares plugin `name` (for provenance in records)."""
    ep = available(group).get(name)
    dist = getattr(ep, "dist", None)
    return {"distribution": dist.name if dist else None, "version": dist.version if dist else None}
