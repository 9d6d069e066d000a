"""EleutherAI delphi's on-disk run folder, read and written byte for byte as delphi writes it.

delphi/__main__.py (process_cache) writes, per latent ``Latent(module, i)`` whose name is
``f"{module}_latent{i}"`` (delphi/latents/latents.py, ``Latent.__repr__``):
- ``explanations/<module>_latent<i>.txt``: ``orjson.dumps(explanation)``, a JSON string (explainer_postprocess;
  the name is not escaped, so delphi cannot write a module with a '/' there);
- ``scores/<scorer>/<module>_latent<i>.txt`` with '/' written as '--': ``orjson.dumps(score)``, a list of
  dataclasses that orjson writes as objects in field order (scorer_postprocess).

orjson, not json: it writes non-ASCII as UTF-8 (json escapes it), floats as their shortest form (one
ten-millionth: orjson ``1e-7``, json ``1e-07``; saebench's fixture has both) and no spaces, so only orjson
gives delphi's bytes. This module imports no torch.
"""

import re
from pathlib import Path
from typing import Any

import orjson

from saebench.errors import SaebenchError
from saebench.records import write_atomic

SCORER_DIRS = {"detection": "detection", "fuzzing": "fuzz", "surprisal": "surprisal", "embedding": "embedding"}
"""saebench scorer name -> delphi's folder under scores/ (delphi's ``Scorer.name``)."""

_CLASSIFIER = ("str_tokens", "activations", "distance", "activating", "prediction", "probability", "correct")
FIELDS = {
    "detection": _CLASSIFIER,  # ClassifierOutput, delphi/scorers/classifier/sample.py
    "fuzz": _CLASSIFIER,
    "surprisal": ("text", "distance", "no_explanation", "explanation", "activations"),  # SurprisalOutput
    "embedding": ("text", "distance", "similarity"),  # EmbeddingOutput, delphi/scorers/embedding/embedding.py
}
"""delphi's score fields per scores/ folder, in its dataclass field order (the order written).
``distance`` is the activating example's quantile (0: strongest) or, for a non-activating one, -1.0 (random)
or minus the neighbour's distance."""

_LATENT_FILE = re.compile(r"^(?P<module>.+)_latent(?P<latent>\d+)\.txt$")


def latent_file_name(module: str, latent: int) -> str:
    """Name of a latent's score file: ``<module>_latent<latent>.txt``, '/' written as '--' (delphi's
    scorer_postprocess); explanation files have the same name, where a '/' is refused."""
    return f"{module}_latent{latent}.txt".replace("/", "--")


def _check_latents(latents: dict[Any, Any], what: str) -> None:
    for latent in latents:
        if not isinstance(latent, int) or isinstance(latent, bool) or latent < 0:
            raise SaebenchError(f"{what}: latent {latent!r} is not a non-negative int")


def _pick_module(found: dict[str, dict[int, Path]], module: str | None, folder: Path, what: str) -> str:
    """The one module of `found` to read: `module`, or the only one there is."""
    if not found:
        raise SaebenchError(f"no delphi {what} (<module>_latent<N>.txt) in {str(folder)!r}")
    names = ", ".join(sorted(found))
    if module is None:
        if len(found) > 1:
            raise SaebenchError(f"delphi {what} in {str(folder)!r} cover several modules ({names}); pick one "
                                "with module=<name>")
        return next(iter(found))
    if module not in found:
        raise SaebenchError(f"delphi {what} in {str(folder)!r} have no module {module!r}; they have {names}")
    return module


def _load(file: Path) -> Any:
    try:
        return orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SaebenchError(f"delphi file {str(file)!r} is not JSON ({exc})") from None


def write_explanations(run_dir: Path, module: str, texts: dict[int, str]) -> list[Path]:
    """Write ``<run_dir>/explanations/<module>_latent<i>.txt`` for each latent as delphi's explainer does.

    Returns:
        The files written, in latent order.
    """
    _check_latents(texts, f"explanations of {module!r}")
    if "/" in module:
        raise SaebenchError(f"module {module!r} has a '/': delphi names explanation files <module>_latent<N>.txt "
                            "unescaped, so it cannot write or find them; rename the module")
    folder = Path(run_dir) / "explanations"
    paths = []
    for latent, text in sorted(texts.items()):
        if not isinstance(text, str):
            raise SaebenchError(f"explanation of latent {latent} is a {type(text).__name__}, not a str")
        path = folder / latent_file_name(module, latent)
        write_atomic(path, orjson.dumps(text))
        paths.append(path)
    return paths


def read_explanations(run_dir: Path, module: str | None = None) -> tuple[str, dict[int, str]]:
    """Read delphi's explanations from a run folder or its explanations/ folder.

    Args:
        module: the module to read; may be left out when the folder holds only one.

    Returns:
        The module name and its explanation per latent.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "explanations" if (run_dir / "explanations").is_dir() else run_dir
    found: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.glob("*.txt")):
        if match := _LATENT_FILE.match(file.name):
            found.setdefault(match["module"], {})[int(match["latent"])] = file
    module = _pick_module(found, module, folder, "explanations")
    texts = {}
    for latent, file in sorted(found[module].items()):
        text = _load(file)
        if not isinstance(text, str):
            raise SaebenchError(f"delphi explanation {str(file)!r} is not a JSON string (delphi writes "
                                "orjson.dumps(explanation))")
        texts[latent] = text
    return module, texts


def _scores_folder(run_dir: Path, scorer: str) -> Path:
    if scorer not in SCORER_DIRS:
        raise SaebenchError(f"unknown delphi scorer {scorer!r}; known: {', '.join(SCORER_DIRS)}")
    run_dir = Path(run_dir)
    scores = run_dir if run_dir.name == "scores" else run_dir / "scores"
    return scores / SCORER_DIRS[scorer]


def write_scores(run_dir: Path, scorer: str, module: str, per_latent: dict[int, list[dict]]) -> list[Path]:
    """Write ``<run_dir>/scores/<delphi scorer>/<latent file>`` per latent, the bytes delphi writes.

    Args:
        scorer: a saebench scorer name, a key of SCORER_DIRS.
        per_latent: per latent, its scored examples; each dict holds at least the scorer's FIELDS (extra keys
            are left out), values as delphi holds them (an int distance is written ``-1``, a float ``-1.0``).

    Returns:
        The files written, in latent order.
    """
    folder = _scores_folder(run_dir, scorer)
    fields = FIELDS[SCORER_DIRS[scorer]]
    _check_latents(per_latent, f"{scorer} scores of {module!r}")
    paths = []
    for latent, examples in sorted(per_latent.items()):
        rows = []
        for n, example in enumerate(examples):
            missing = [f for f in fields if f not in example]
            if missing:
                raise SaebenchError(f"{scorer} score of latent {latent}, example {n} lacks {', '.join(missing)} "
                                    f"(delphi's fields: {', '.join(fields)})")
            rows.append({f: example[f] for f in fields})
        try:
            data = orjson.dumps(rows)
        except orjson.JSONEncodeError as exc:
            raise SaebenchError(f"{scorer} scores of latent {latent} are not JSON-serialisable ({exc})") from None
        path = folder / latent_file_name(module, latent)
        write_atomic(path, data)
        paths.append(path)
    return paths


def read_scores(run_dir: Path, scorer: str, module: str | None = None) -> tuple[str, dict[int, list[dict]]]:
    """Read delphi's scores of one scorer from a run folder (or its scores/ folder).

    Args:
        scorer: a saebench scorer name, a key of SCORER_DIRS.
        module: the module to read ('/' or its '--' form); may be left out when there is only one.

    Returns:
        The module name ('--' read back as '/') and, per latent, its examples as dicts in delphi's field order.
    """
    folder = _scores_folder(run_dir, scorer)
    if not folder.is_dir():
        raise SaebenchError(f"no delphi {scorer} scores: folder {str(folder)!r} does not exist")
    fields = FIELDS[SCORER_DIRS[scorer]]
    found: dict[str, dict[int, Path]] = {}
    for file in sorted(folder.glob("*.txt")):
        if match := _LATENT_FILE.match(file.name):
            found.setdefault(match["module"].replace("--", "/"), {})[int(match["latent"])] = file
    module = _pick_module(found, module if module is None else module.replace("--", "/"), folder,
                          f"{scorer} scores")
    per_latent = {}
    for latent, file in sorted(found[module].items()):
        examples = _load(file)
        if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
            raise SaebenchError(f"delphi score file {str(file)!r} is not a JSON list of objects")
        for n, example in enumerate(examples):
            if missing := [f for f in fields if f not in example]:
                raise SaebenchError(f"delphi score file {str(file)!r}: example {n} lacks {', '.join(missing)}")
        per_latent[latent] = examples
    return module, per_latent
