"""`saebench sweep`: a grid of models × encoders × tasks × seeds, each cell one `evaluate()` call.

A sweep is only a list of jobs. A job is the `saebench run` of one model, one encoder entry (a spec, or
specs run together so that they share the task's clean pass), one task and one seed, writing its records
into the sweep's one output folder. Jobs run one after another in this process, or as Ray tasks (`--ray`);
either way a rerun reuses every record a finished job wrote (the runner's config hash), so a sweep cut short
computes only what is missing. Scheduling, retries and placement are Ray's: this module only hands it jobs.
"""

import importlib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from saebench import records
from saebench.encoders.base import encoder_class
from saebench.encoders.specs import expand_encoder_specs
from saebench.errors import SaebenchError, did_you_mean
from saebench.models import DTYPES, LoadedModel, load_model, model_presets
from saebench.runner import RunConfig, check_config, evaluate
from saebench.tasks.names import accepted_params, params_for, resolve_task

SWEEP_KEYS = ("models", "encoders", "tasks", "seeds", "settings", "resources")
SETTINGS = ("hookpoint", "limit", "context_len", "batch_size", "corpus", "splice_bos", "dtype", "device",
            "task_params", "encoder_options", "max_failed", "reuse_prefix", "cache_references")
"""The RunConfig fields a sweep file may set; the seed is a grid axis, the output folder and bars the command's."""
RESOURCES = ("num_cpus", "num_gpus", "memory", "max_retries")
"""What a job may ask Ray for (ray.remote's options of the same names)."""
_ELSEWHERE = {"seed": "give 'seeds: [...]' at the top level", "output_dir": "pass --output",
              "progress": "pass --quiet", "reuse": "records are always reused; delete them to recompute"}


@dataclass(frozen=True)
class Job:
    """One cell of the grid: the arguments of one evaluate() call."""

    model: str | None
    """Preset, hub id or path; None for a task without a language model."""
    encoders: tuple[str, ...]
    """Encoder specs run together (they share the task's clean pass)."""
    task: str
    seed: int

    def __str__(self) -> str:
        return f"model={self.model} encoders={','.join(self.encoders)} task={self.task} seed={self.seed}"


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see docs/sweeps.md)."""

    models: tuple[str, ...]
    """Models to run every model task on; empty only when no task needs a model."""
    encoders: tuple[tuple[str, ...], ...]
    """Encoder entries: the specs of one entry run together in one job."""
    tasks: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    settings: dict[str, Any] = field(default_factory=dict)
    """RunConfig fields of every job (the SETTINGS)."""
    resources: dict[str, Any] = field(default_factory=dict)
    """Ray options of every job (the RESOURCES); default 1 CPU, and 1 GPU for a model job where Ray has GPUs."""


@dataclass
class JobOutcome:
    """What one job did: records computed and reused, or the first line of the error that stopped it."""

    job: Job
    computed: int = 0
    reused: int = 0
    error: str | None = None


@dataclass
class SweepSummary:
    """The outcomes of a sweep's jobs (of its shard), in the order they finished."""

    outcomes: list[JobOutcome]
    output_dir: Path

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.error is not None]

    def line(self) -> str:
        ok = [o for o in self.outcomes if o.error is None]
        reused = sum(1 for o in ok if not o.computed)
        return (f"{len(self.outcomes)} jobs: {len(ok) - reused} computed, {reused} reused, {len(self.failed)} "
                f"failed; {sum(o.computed for o in ok)} records written, {sum(o.reused for o in ok)} reused, "
                f"in {self.output_dir}/")


# --- reading a sweep file -----------------------------------------------------------------------------


def load_sweep(path: Path) -> Sweep:
    """Read and check the structure of a sweep YAML file; names are checked by run_sweep."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SaebenchError(f"cannot read sweep file {str(path)!r} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SaebenchError(f"sweep file {str(path)!r} is not valid YAML{where}: "
                            f"{getattr(exc, 'problem', None) or exc}") from exc
    return parse_sweep(data, str(path))


def parse_sweep(data: Any, where: str = "the sweep") -> Sweep:
    """A Sweep from the mapping a sweep file holds; `where` names it in errors."""
    if not isinstance(data, dict):
        raise SaebenchError(f"{where} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    _known_keys(data, SWEEP_KEYS, f"key in {where}")
    for key in ("encoders", "tasks"):
        if not data.get(key):
            raise SaebenchError(f"{where} has no {key}: give '{key}: [...]'")
    entries = [tuple(_strings(e, f"encoder entry in {where}")) for e in _as_list(data["encoders"])]
    if not all(entries):
        raise SaebenchError(f"an encoder entry in {where} is empty; give one spec or a list of specs")
    seeds = _as_list(data.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SaebenchError(f"seeds in {where} must be a list of integers, not {data.get('seeds')!r}")
    settings, resources = data.get("settings") or {}, data.get("resources") or {}
    for name, value, known in (("settings", settings, SETTINGS), ("resources", resources, RESOURCES)):
        if not isinstance(value, dict):
            raise SaebenchError(f"{name} in {where} must be a mapping, not {value!r}")
        for key in value:
            if key in _ELSEWHERE:
                raise SaebenchError(f"{key!r} is no setting of a sweep: {_ELSEWHERE[key]}")
        _known_keys(value, known, f"{name[:-1]} in {where}")
    return Sweep(tuple(_strings(data.get("models") or [], f"model in {where}")), tuple(entries),
                 tuple(_strings(data["tasks"], f"task in {where}")), tuple(seeds), dict(settings), dict(resources))


def _known_keys(mapping: dict, known: Sequence[str], what: str) -> None:
    for key in mapping:
        if key not in known:
            raise SaebenchError(f"unknown {what}: {key!r}{did_you_mean(str(key), known)}; "
                                f"known: {', '.join(known)}")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _strings(value: Any, what: str) -> list[str]:
    items = _as_list(value)
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise SaebenchError(f"each {what} must be a name (a string), not {value!r}")
    return [v.strip() for v in items]


# --- checking names and expanding the grid -------------------------------------------------------------


def check_sweep(sweep: Sweep, output_dir: Path) -> None:
    """Fail with one line, before any job runs, on a setting, encoder, task or model that cannot run."""
    hints = typing.get_type_hints(RunConfig)
    for key, value in sweep.settings.items():
        if not _fits(value, hints[key]):
            raise SaebenchError(f"setting {key!r} must be {_type_name(hints[key])}, not {value!r}")
    if (dtype := sweep.settings.get("dtype")) is not None and dtype not in (*DTYPES, "auto"):
        raise SaebenchError(f"unknown dtype {dtype!r} in settings; choose auto or one of {', '.join(DTYPES)}")
    for entry in sweep.encoders:
        for spec in expand_encoder_specs(entry):
            encoder_class(spec)
    task_params = sweep.settings.get("task_params", {})
    tasks = [resolve_task(name, params_for(name, task_params, sweep.tasks)) for name in sweep.tasks]
    if not sweep.models and (needing := [n for n, t in zip(sweep.tasks, tasks) if t.needs_model]):
        raise SaebenchError(f"task {needing[0]!r} runs on a language model: give 'models: [...]' in the sweep")
    for task in (t for t in tasks if not t.needs_model):
        for entry in sweep.encoders:
            task.check_specs(expand_encoder_specs(entry))
    presets = model_presets()
    for model in sweep.models:
        if model not in presets and not Path(model).exists() and "/" not in model:
            raise SaebenchError(f"unknown model {model!r}{did_you_mean(model, presets)}; use a preset "
                                f"({', '.join(presets)}), a Hugging Face hub id, or a local path")
    # the runner's own checks of the numbers (and that records can be written), made once for all jobs
    config = RunConfig(**(sweep.settings | {"task_params": {}}), output_dir=output_dir)
    check_config(config, sweep.encoders[0], sweep.tasks)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a RunConfig field's annotation (an int is a float; a bool is no number)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    base = typing.get_origin(annotation) or annotation
    if base is type(None):
        return value is None
    if base in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if base is float else base)


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             type(None): "null"}
    return " or ".join(words.get(typing.get_origin(a) or a, str(a)) for a in args or (annotation,))


def expand_jobs(sweep: Sweep) -> list[Job]:
    """Every job of the grid, model-major (consecutive jobs share a model); a task without a model gets one
    job per encoder entry and seed whatever the models, and a job given twice runs once."""
    task_params = sweep.settings.get("task_params", {})
    needs_model = {name: resolve_task(name, params_for(name, task_params, sweep.tasks)).needs_model
                   for name in sweep.tasks}
    jobs: dict[Job, None] = {}
    for model in sweep.models or (None,):
        for seed in sweep.seeds:
            for entry in sweep.encoders:
                for task in sweep.tasks:
                    jobs[Job(model if needs_model[task] else None, entry, task, seed)] = None
    return list(jobs)


def shard_jobs(jobs: list[Job], shard: str) -> list[Job]:
    """The jobs of shard 'i/N' (0 <= i < N): job k goes to shard k % N, so the N shards partition the list."""
    index, sep, count = shard.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SaebenchError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4, or $SLURM_ARRAY_TASK_ID/4), "
                            f"not {shard!r}")
    return jobs[int(index)::int(count)]


# --- running jobs -----------------------------------------------------------------------------------------

_MODELS: dict[tuple, LoadedModel] = {}
"""The model a Ray worker loaded last, kept for its next job on the same model, dtype and device."""


def run_job(job: Job, settings: dict[str, Any], output_dir: Path, progress: bool,
            models: dict[tuple, LoadedModel] | None = None) -> JobOutcome:
    """Run one job (in this process or a Ray worker); an error becomes the outcome's one-line `error`.

    Args:
        settings: the sweep's RunConfig fields.
        models: the last model loaded, by (model, dtype, device), reused and replaced here; default a
            module-level one, which lives as long as the (Ray worker) process.
    """
    models = _MODELS if models is None else models
    if not progress:  # nor the bars of transformers' loading (a Ray worker's would land in the driver's log)
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        params = {k: v for k, v in settings.get("task_params", {}).items() if k in accepted_params(job.task)}
        config = RunConfig(**(settings | {"task_params": params}), seed=job.seed, output_dir=output_dir,
                           progress=progress)
        # a record whose file was there before the job and is unchanged after it was reused; any other, written
        folder = records.record_path(output_dir, resolve_task(job.task, params).spec.name, "", "").parent
        before = {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}
        model: str | LoadedModel | None = job.model
        if job.model is not None:
            key = (job.model, config.dtype, config.device)
            if key not in models:
                models.clear()  # one model at a time: the last one is freed before the next loads
                models[key] = load_model(*key)
            model = models[key]
        recs = evaluate(model, job.encoders, [job.task], config)
    except Exception as exc:  # noqa: BLE001 - a failed job is reported and the sweep goes on
        return JobOutcome(job, error=_first_line(exc))
    paths = [records.record_path(output_dir, r.task["name"], r.encoder["label"], r.config_hash) for r in recs]
    reused = sum(1 for p in paths if p in before and p.exists() and p.stat().st_mtime_ns == before[p])
    return JobOutcome(job, computed=len(recs) - reused, reused=reused)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(exc, SaebenchError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def run_sweep(sweep: Sweep, output_dir: Path = Path("saebench_runs"), *, shard: str | None = None,
              ray_address: str | None = None, quiet: bool = False) -> SweepSummary:
    """Check the sweep, then run its jobs (of `shard`, 'i/N') in this process or, given `ray_address`, on Ray.

    Args:
        ray_address: None runs in this process; 'local' lets ray.init() choose (RAY_ADDRESS, else a new local
            Ray); anything else is ray.init's address ('auto', 'ray://host:10001'). A Ray already initialized
            in this process is used as it is.
        quiet: no progress bars (the sweep's and, in process, each job's).
    Returns:
        The outcomes; failed jobs were reported on stderr as they finished.
    """
    if ray_address is not None:
        try:
            importlib.import_module("ray")
        except ImportError as exc:
            raise SaebenchError("--ray needs Ray, an optional extra: pip install 'saebench[ray]'") from exc
    jobs = expand_jobs(sweep) if shard is None else shard_jobs(expand_jobs(sweep), shard)
    output_dir = Path(output_dir).absolute()  # Ray workers may start elsewhere (and no config hash holds it)
    check_sweep(sweep, output_dir)
    bar = tqdm(total=len(jobs), desc="sweep", unit="job", disable=quiet, file=sys.stderr)
    outcomes: list[JobOutcome] = []

    def report(outcome: JobOutcome) -> None:
        outcomes.append(outcome)
        if outcome.error is not None:
            bar.write(f"saebench: job failed ({outcome.job}): {outcome.error}", file=sys.stderr)
        bar.update()

    try:
        if ray_address is None:
            models: dict[tuple, LoadedModel] = {}  # freed when the sweep ends
            for job in jobs:
                report(run_job(job, sweep.settings, output_dir, not quiet, models))
        else:
            _run_on_ray(jobs, sweep, output_dir, ray_address, quiet, report)
    finally:
        bar.close()
    return SweepSummary(outcomes, output_dir)


def _run_on_ray(jobs: list[Job], sweep: Sweep, output_dir: Path, address: str, quiet: bool,
                report: Callable[[JobOutcome], None]) -> None:
    """Submit every job as a Ray task and report each as it finishes; a worker that dies fails its job."""
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address,
                 logging_level=logging.WARNING if quiet else logging.INFO)
    pending: dict = {}
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        # run_job is looked up now, not at import, so the job function is whatever this module holds
        task = ray.remote(run_job)
        # a job's bars would interleave in the driver's log with every other worker's: workers run without
        pending = {task.options(**_ray_options(job, sweep.resources, gpus)).remote(
            job, sweep.settings, output_dir, False): job for job in jobs}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            try:
                report(ray.get(ref))
            except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory) or Ray failed
                report(JobOutcome(job, error=_first_line(exc)))
    finally:
        for ref in pending:  # stopped early (Ctrl-C): a cluster that outlives the sweep drops its jobs too
            ray.cancel(ref)
        if started:
            ray.shutdown()


def _ray_options(job: Job, resources: dict[str, Any], cluster_has_gpus: bool) -> dict[str, Any]:
    """A job asks Ray for 1 CPU, and 1 GPU where it runs a model and the cluster has GPUs; no retries, since
    a rerun of the sweep resumes instead. The sweep's `resources` override these for every job."""
    gpus = 1 if job.model is not None and cluster_has_gpus else 0
    return {"num_cpus": 1, "num_gpus": gpus, "max_retries": 0} | resources
