"""Task and preset names to Task objects: entry points, tasks/*.yaml presets, and '?key=value' parameters."""

import inspect
from collections.abc import Sequence
from typing import Any

from saebench.encoders.specs import split_options
from saebench.errors import SaebenchError, did_you_mean
from saebench.presets import load_presets
from saebench.registry import TASK_GROUP, available, load_plugin
from saebench.tasks.base import Task


def task_names() -> dict[str, str]:
    """Every runnable task name -> its description (entry points and tasks/*.yaml presets)."""
    out = {name: "" for name in available(TASK_GROUP)}
    for name, preset in load_presets("tasks", "*").items():
        out[name] = preset.get("description", "")
    return out


def resolve_task(name: str, overrides: dict[str, Any] | None = None) -> Task:
    """A task by entry-point name or preset name, with preset parameters applied.

    'plugin:arg' (e.g. 'lm_eval:hellaswag') passes `arg` to the plugin as the parameter 'arg';
    'name?key=value&...' passes parameters (e.g. 'synthetic?n_sources=32&k_active=5').
    """
    name, options = split_options(name)
    presets = load_presets("tasks", "*")
    preset = presets.get(name, {})
    plugin = preset.get("task", name)
    base, sep, arg = plugin.partition(":")
    if sep and plugin not in available(TASK_GROUP) and base in available(TASK_GROUP):
        plugin, preset = base, preset | {"params": {**preset.get("params", {}), "arg": arg}}
    if plugin not in available(TASK_GROUP):
        raise SaebenchError(f"unknown task {name!r}{did_you_mean(name, task_names())}; "
                            "`saebench list tasks` shows them all")
    cls = load_plugin(TASK_GROUP, plugin)
    params = {**preset.get("params", {}), **(overrides or {}), **options}
    init = inspect.signature(cls.__init__).parameters
    if cls.from_params.__func__ is Task.from_params.__func__ and all(p.kind != p.VAR_KEYWORD for p in init.values()):
        accepted = [p for p in init if p != "self"]  # what Task.from_params passes them to
        for key in params:
            if key not in accepted:
                raise SaebenchError(f"task {name!r} takes no parameter {key!r}{did_you_mean(key, accepted)}; "
                                    f"its parameters are {', '.join(accepted) or 'none'}")
    try:
        return cls.from_params(params)
    except TypeError as exc:
        raise SaebenchError(f"task {name!r}: bad parameters {params}: {exc}") from exc


RUN_SETTINGS = {"limit": "--limit", "context_len": "--context-len"}
"""Run-wide settings a preset's protocol may fix, and the flag that would change them."""


def check_protocol(name: str, overrides: dict[str, Any], run_settings: dict[str, Any]) -> None:
    """A preset that follows a source's protocol (its `protocol:` list names the parameters and run settings the
    source fixes) refuses values that change them: one SaebenchError naming the option and the plain task to use.

    Args:
        overrides: run-wide task parameters (--max-len, --data-file ...), merged under the name's own ?options.
        run_settings: --limit and --context-len as given (None when not).
    """
    base, options = split_options(name)
    preset = load_presets("tasks", "*").get(base, {})
    fixed = preset.get("protocol") or []
    if not fixed:
        return
    params = preset.get("params", {})
    given = {**overrides, **options}
    for key in fixed:
        tries = [(given.get(key), f"{key}={given.get(key)}")]
        if flag := RUN_SETTINGS.get(key):
            tries.append((run_settings.get(key), f"{flag} {run_settings.get(key)}"))
        for value, what in tries:
            if value is None or str(value) == str(params.get(key)):  # the preset's own value contradicts nothing
                continue
            source = preset.get("source", "its source")
            raise SaebenchError(f"task preset {base!r} follows the protocol of source {source}"
                                + (f" with {key}={params[key]}" if key in params else "")
                                + f"; {what} contradicts it: run task {preset.get('task', base)!r} to change {key}")


def accepted_params(name: str) -> set[str]:
    """Parameter names the task behind `name` (entry point or preset) takes."""
    presets = load_presets("tasks", "*")
    plugin = presets.get(split_options(name)[0], {}).get("task", split_options(name)[0])
    base = plugin if plugin in available(TASK_GROUP) else plugin.partition(":")[0]
    if base not in available(TASK_GROUP):
        return set()  # resolve_task reports the unknown name
    return set(inspect.signature(load_plugin(TASK_GROUP, base).__init__).parameters) - {"self"}


def params_for(name: str, params: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The run-wide task parameters (e.g. --data-file) that task `name` takes; each must fit some task."""
    for key in params:
        if not any(key in accepted_params(t) for t in tasks):
            option = "--" + key.replace("_", "-")
            takers = sorted(n for n in available(TASK_GROUP) if key in accepted_params(n))
            raise SaebenchError(f"{option} applies to none of the tasks given ({', '.join(tasks)}); "
                                f"tasks that take it: {', '.join(takers)}")
    return {k: v for k, v in params.items() if k in accepted_params(name)}
