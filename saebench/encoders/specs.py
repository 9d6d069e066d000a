"""Encoder spec strings: ``name[:arg][?key=value&...][@hookpoint]``, patterns and presets.

- ``@hookpoint`` places the encoder (``sae:default@layers.5.resid_post``); it wins over --hookpoint.
- ``?key=value&...`` are options of the encoder family (``sae:default?context_len=1024``); they
  stay part of the label, so records and leaderboards show them.
- ``{a,b,c}`` and ``{a..b}`` expand like a shell's braces, anywhere in the spec:
  ``sae:default@layers.{5,15,25}.resid_post`` is three encoders, one per layer.
- A preset name from registry/encoders.yaml (``presets:``) stands for the specs it lists, e.g.
  ``gpt2-small-res-jb``: sae-lens's pretrained gpt2-small residual SAEs, one per layer.
"""

import re
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from saebench.errors import SaebenchError
from saebench.presets import load_presets

_BRACES = re.compile(r"\{([^{}]*)\}")
_HOOKPOINT_TEXT = re.compile(r"^[A-Za-z0-9_.]+$")
MAX_EXPANSION = 4096
"""More specs than this from one pattern is a typo, not a run."""

T = TypeVar("T")


def expand_braces(text: str) -> list[str]:
    """Every string `text` stands for: '{5,15}' lists alternatives, '{0..3}' an inclusive integer range."""
    match = _BRACES.search(text)
    if match is None:
        if "{" in text or "}" in text:
            raise SaebenchError(f"unbalanced braces in encoder spec {text!r}; write e.g. layers.{{5,15,25}}.resid_post")
        return [text]
    body = match.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.strip().lstrip("-").isdigit() and hi.strip().lstrip("-").isdigit()):
            raise SaebenchError(f"bad range {{{body}}} in encoder spec {text!r}; write e.g. {{0..11}}")
        a, b = int(lo), int(hi)
        items = [str(i) for i in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    else:
        items = [item.strip() for item in body.split(",")]
        if not all(items):
            raise SaebenchError(f"empty alternative in {{{body}}} of encoder spec {text!r}")
    out = [s for item in items for s in expand_braces(text[:match.start()] + item + text[match.end():])]
    if len(out) > MAX_EXPANSION:
        raise SaebenchError(f"encoder spec {text!r} expands to {len(out)} encoders (at most {MAX_EXPANSION})")
    return out


def encoder_presets() -> dict[str, dict[str, Any]]:
    """Encoder presets (registry/encoders.yaml, key 'presets'): name -> {description, encoders}."""
    return load_presets("registry", "encoders").get("presets", {}) or {}


def expand_encoder_specs(specs: Sequence[str]) -> list[str]:
    """Presets replaced by their specs, then brace patterns expanded; order kept."""
    presets = encoder_presets()
    out: list[str] = []
    for spec in specs:
        base, hookpoint = split_hookpoint(spec.strip())
        if base in presets:
            listed = presets[base]["encoders"]
            if hookpoint:  # a preset's members carry their own hookpoints
                raise SaebenchError(f"encoder preset {base!r} places its encoders itself; drop '@{hookpoint}'")
            for item in listed:
                out.extend(expand_braces(item))
        else:
            out.extend(expand_braces(spec.strip()))
    return out


def split_hookpoint(spec: str) -> tuple[str, str | None]:
    """'sae:default@layers.5.resid_post' -> ('sae:default', 'layers.5.resid_post'); no '@': (spec, None)."""
    head, sep, tail = spec.rpartition("@")
    if sep and head and _HOOKPOINT_TEXT.match(tail):
        return head, tail
    return spec, None


def split_options(arg: str | None) -> tuple[str | None, dict[str, str]]:
    """'default?context_len=1024&k=64' -> ('default', {'context_len': '1024', 'k': '64'})."""
    if arg is None or "?" not in arg:
        return arg, {}
    base, _, query = arg.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=True)
    except ValueError as exc:
        raise SaebenchError(f"bad options {query!r} in encoder argument {arg!r}: write ?key=value&key2=value2") from exc
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise SaebenchError(f"option {key!r} given twice in encoder argument {arg!r}")
        options[key] = value
    return base or None, options


def apply_options(config: T, options: dict[str, str], what: str) -> T:
    """A copy of dataclass `config` with `options` (strings) converted to each field's type.

    Args:
        what: the encoder, for error messages (e.g. "sae:default").
    """
    types = {f.name: type(getattr(config, f.name)) for f in fields(config)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, text in options.items():
        if key not in types:
            raise SaebenchError(f"{what} has no option {key!r}; its options are {', '.join(types)}")
        kind = types[key]
        try:
            values[key] = {bool: lambda t: {"true": True, "false": False}[t.lower()]}.get(kind, kind)(text)
        except (ValueError, KeyError) as exc:
            wanted = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)
            raise SaebenchError(f"option {key}={text!r} of {what} must be {wanted}") from exc
    return replace(config, **values)  # type: ignore[type-var]
