"""Typed task parameters: a value from a preset or from '?name=value' that contradicts its type is one clear
SaebenchError naming the task, the parameter and what it takes."""

from typing import Any

from saebench.errors import SaebenchError


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
