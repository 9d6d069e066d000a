"""Make `lm_eval --model saebench` work from lm-eval's own CLI, without importing anything early.

lm-eval 0.4.12 and 0.4.13 (the versions saebench is tested with) read no entry points for models:
its registry holds `lm_eval.models.MODEL_MAPPING`
and whatever `@register_model` classes were imported. The saebench wheel therefore ships
`saebench_lm_eval.pth`, which Python's `site` module runs at start-up. That line loads this
file as a standalone module (never the `saebench` package, which imports torch) and calls
`install()`, which only adds an import hook: when lm-eval
imports `lm_eval.models` (its model table), the hook registers 'saebench' as a lazy
'module:Class' placeholder there, so saebench, torch and the model code load only when a
user actually asks lm-eval for `--model saebench`.
"""

import importlib.abc
import importlib.machinery
import sys

MODEL_NAME = "saebench"
MODEL_TARGET = "saebench.lm_eval_model:SaebenchLM"
_WATCHED = "lm_eval.models"


def register() -> None:
    """Register the lazy placeholder in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs lm_eval.models as usual, then registers saebench beside its own models."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        safe_register()


class _Finder(importlib.abc.MetaPathFinder):
    saebench_lm_eval = True
    """Marker: the .pth may run twice (a venv's lib64 -> lib link), each time with a fresh class."""

    def find_spec(self, name, path, target=None):
        if name != _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def safe_register() -> None:
    """register(), but never let a failure break lm-eval for its other models.

    The hook runs inside the import of lm_eval.models, so an exception here (an lm-eval whose
    registry changed, say) would break every `lm_eval` command. Instead the failure is kept and
    reported in one line when the command line asks for `--model saebench`.
    """
    global FAILURE
    try:
        register()
    except Exception as exc:  # noqa: BLE001 - any failure must stay inside saebench
        FAILURE = f"{type(exc).__name__}: {exc}"
        if _asks_for_saebench(sys.argv):
            print(f"saebench: warning: could not register `--model saebench` with lm-eval {_lm_eval_version()} "
                  f"({FAILURE}); {SUPPORTED_TEXT}", file=sys.stderr)


FAILURE: str | None = None
"""Why registration failed, if it did."""
TESTED_LM_EVAL = ("0.4.12", "0.4.13")
"""lm-eval versions the test suite runs against (`make test-lm-eval-versions`)."""
SUPPORTED_LM_EVAL = ">=0.4.12,<0.5"
"""What saebench accepts: 0.4.12 introduced the TaskManager.load / _yaml_loader API it uses."""
SUPPORTED_TEXT = (f"saebench supports lm-eval {SUPPORTED_LM_EVAL} (tested with {' and '.join(TESTED_LM_EVAL)}): "
                  f"pip install 'lm-eval{SUPPORTED_LM_EVAL}'")


def lm_eval_version_problem() -> str | None:
    """One line saying why the installed lm-eval cannot be used by saebench, or None when it can."""
    version = _lm_eval_version()
    if version == "(unknown version)":
        return f"lm-eval is not installed; {SUPPORTED_TEXT}"
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])
    if not (0, 4, 12) <= parts < (0, 5):
        return f"lm-eval {version} is installed; {SUPPORTED_TEXT}"
    return None


def _asks_for_saebench(argv: list[str]) -> bool:
    return any(a == f"--model={MODEL_NAME}" or (a == "--model" and argv[i + 1:i + 2] == [MODEL_NAME])
               for i, a in enumerate(argv))


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "(unknown version)"


def install() -> None:
    """Add the import hook (or register at once if lm-eval's model table is already imported)."""
    if _WATCHED in sys.modules:
        safe_register()
    elif not any(getattr(f, "saebench_lm_eval", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
