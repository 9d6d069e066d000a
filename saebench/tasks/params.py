"""Typed task parameters: a value from a preset or from '?name=value' that contradicts its type is one clear
SaebenchError naming the task, the parameter and what it takes."""

from typing import Any

from saebench.errors import SaebenchError


def added_at_default(config: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """A task's config without the parameters added after its records were first made, where they hold the value
    that reproduces those records: a record made before a parameter existed keeps its config hash, so it is still
    reused and shares its leaderboard table (as ADDED_FIELDS does for the default SAE's cache key)."""
    return {k: v for k, v in config.items() if k not in added or v != added[k]}


def whole(task: str, name: str, value: Any, minimum: int) -> int:
    """A whole-number parameter (an int, or its text) of at least `minimum`."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or isinstance(value, bool) or str(n) != str(value).strip() or n < minimum:
        raise SaebenchError(f"{task} parameter {name}={value!r}: give a whole number of at least {minimum}")
    return n


def choice(task: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """A parameter that names one of `allowed`."""
    if str(value) not in allowed:
        raise SaebenchError(f"{task} parameter {name}={value!r}: choose {' or '.join(allowed)}")
    return str(value)
