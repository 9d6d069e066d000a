"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

import difflib
from collections.abc import Iterable


class SaebenchError(Exception):
    """Bad input or an unusable environment; the message says what was wrong and what to do."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
