"""evaluate(): the one entry point the CLI and the tests both call."""

import fcntl
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from saebench import distributed, records
from saebench.answers import answer_counts, sum_answers, task_answers, too_many_failed
from saebench.corpus import CorpusSpec
from saebench.encoders.base import BuildContext, Encoder, encoder_class
from saebench.encoders.specs import expand_encoder_specs, split_hookpoint
from saebench.errors import SaebenchError
from saebench.models import LoadedModel, cache_dir, load_model
from saebench.registry import ENCODER_GROUP, distribution_of
from saebench.splice import SpliceConfig
from saebench.tasks.base import PartialStore, Row, RunSettings, Task, TaskContext, TaskResult, row_key
from saebench.tasks.names import check_protocol, params_for, resolve_task


@dataclass(frozen=True)
class RunConfig:
    """Settings of one `saebench run`."""

    hookpoint: str | None = None
    """Where to splice; default: the SAE's own hookpoint, else the model preset's."""
    limit: int | None = None
    """Tokens (ce_kl) or items (benchmarks) to evaluate; None for each task's default."""
    context_len: int | None = None
    """Tokens per context; None for each task's default."""
    batch_size: int = 8
    """Contexts per forward pass. Not part of the config hash: results agree up to float rounding (in bf16 a
    logit can depend on its batch's padded shape, as with lm-eval's own --batch_size)."""
    seed: int = 0
    """Decides which held-out contexts are drawn."""
    corpus: str = "wiki"
    """'wiki' (embedded) or 'hf:<dataset>[:<config>]'."""
    splice_bos: bool = False
    """Also splice BOS / attention-sink positions (they are never averaged into metrics)."""
    dtype: str | None = None
    """Model dtype: 'auto' (default: bfloat16 where the hardware runs it natively, else float32), or
    'float32' / 'bfloat16' / 'float16'."""
    device: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    output_dir: Path = Path("saebench_runs")
    """Where records are written."""
    reuse: bool = True
    """Reuse a finished record with the same config hash instead of recomputing."""
    progress: bool = True
    reuse_prefix: bool = True
    """Run the layers below the hookpoint once per batch, and only the layers above it per encoder."""
    cache_references: bool = True
    """Keep reference passes (ce_kl's clean, zero and mean passes; the clean and zero passes of the item-scoring
    tasks) in saebench's cache and reuse them."""
    task_params: dict[str, Any] = field(default_factory=dict)
    """Extra task parameters, overriding presets."""
    encoder_options: dict[str, dict[str, str]] = field(default_factory=dict)
    """Option defaults by encoder family (e.g. {'llm_sim': {'llm_url': ...}} from --llm-url); a spec's own
    options win."""
    # a run setting, not an llm_sim option: the runner checks it for every encoder that reports answers
    # (FAILURE_KEYS), a plugin's too, and it changes no number, only whether one is written (so it is not hashed)
    max_failed: float = 0.02
    """Largest share of an encoder's answers in one task (an LLM simulator's) that may have failed or been
    unparsed; above it the task writes no record and says why (--max-failed)."""




def build_encoders(specs: Sequence[str], model: LoadedModel, config: RunConfig) -> dict[str, list[Encoder]]:
    """Build every encoder spec (presets and patterns expanded) against `model`, grouped by hookpoint.

    An '@hookpoint' in a spec places that encoder (it wins over --hookpoint); otherwise the
    encoder's own hookpoint (an SAE's), else --hookpoint, else the model preset's.
    """
    expanded = expand_encoder_specs(specs)
    placed = [(spec, *split_hookpoint(spec)) for spec in expanded]
    for spec, _, at in placed:  # every name and hookpoint valid before anything is built or trained
        encoder_class(spec)
        if at is not None:
            model.hookpoint(at)
    groups: dict[str, list[Encoder]] = {}
    memo: dict = {}  # inner encoders named by several specs are built once
    for spec, base, at in placed:
        # training sets and latent samples follow the run's corpus and batch size, on the model's device
        build = BuildContext(model, at or config.hookpoint, cache_dir(), config.seed,
                             config.progress and distributed.is_main(), memo=memo,
                             option_defaults=config.encoder_options, corpus=config.corpus,
                             batch_size=config.batch_size)
        enc = build.build(base)
        if enc.spec.d_in != model.d_model:
            raise SaebenchError(f"encoder {spec!r} has d_in {enc.spec.d_in} but model {model.name!r} "
                                f"has width {model.d_model}")
        hp = _hookpoint_of(enc, model, at or config.hookpoint)
        group = groups.setdefault(hp, [])
        if any(e.spec.label == enc.spec.label for e in group):
            raise SaebenchError(f"encoder {enc.spec.label!r} is given twice at {hp}; give each encoder once")
        group.append(enc)
    return groups


def build_encoder(spec: str, model: LoadedModel, config: RunConfig) -> tuple[Encoder, str]:
    """One encoder and its hookpoint, for callers that splice a single encoder (lm-eval's `--model saebench`)."""
    if len(expanded := expand_encoder_specs([spec])) != 1:
        raise SaebenchError(f"encoder spec {spec!r} stands for {len(expanded)} encoders; give exactly one here")
    ((hookpoint, (encoder,)),) = build_encoders(expanded, model, config).items()
    return encoder, hookpoint


def _hookpoint_of(enc: Encoder, model: LoadedModel, asked: str | None) -> str:
    name = enc.spec.hookpoint or asked or model.default_hookpoint
    if name is None:
        raise SaebenchError(f"no hookpoint for encoder {enc.spec.label!r}: pass --hookpoint "
                            f"(e.g. layers.{len(model.layers()) // 2}.resid_post) or write it as "
                            f"{enc.spec.label}@layers.{len(model.layers()) // 2}.resid_post")
    return model.hookpoint(name).name


def check_config(config: RunConfig, encoders: Sequence[str], tasks: Sequence[str]) -> None:
    """Bad settings, no encoder or task, or an --output that cannot be written: one SaebenchError before any
    work (the runner's and the sweep's check)."""
    if not encoders:
        raise SaebenchError("no encoder given: pass at least one --encoder (e.g. --encoder identity)")
    if not tasks:
        raise SaebenchError("no task given: pass at least one --task (e.g. --task ce_kl)")
    if config.limit is not None and config.limit <= 0:
        raise SaebenchError(f"--limit must be a positive number, not {config.limit}")
    if config.batch_size <= 0:
        raise SaebenchError(f"--batch-size must be positive, not {config.batch_size}")
    if config.context_len is not None and config.context_len < 2:
        raise SaebenchError(f"--context-len must be at least 2, not {config.context_len}")
    if not 0.0 <= config.max_failed <= 1.0:
        raise SaebenchError(f"--max-failed is a share of the answers, from 0 to 1, not {config.max_failed}")
    for name in tasks:
        check_protocol(name, params_for(name, config.task_params, tasks),
                       {"limit": config.limit, "context_len": config.context_len})
    _check_writable(Path(config.output_dir))


def _check_writable(folder: Path) -> None:
    """Fail before any work when records could not be written to `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SaebenchError(f"cannot write records to --output {str(folder)!r} ({exc.strerror or exc}); "
                            "choose a folder you can write to") from exc


def _check_context_len(config: RunConfig, model: LoadedModel) -> None:
    """--context-len must fit the model's position embeddings (checked before any forward pass)."""
    limit = model.max_positions
    if config.context_len is not None and limit and config.context_len > limit:
        raise SaebenchError(f"--context-len {config.context_len} is longer than model {model.name!r} "
                            f"supports ({limit} positions)")


def evaluate(model: str | LoadedModel | None, encoders: Sequence[str], tasks: Sequence[str],
             config: RunConfig = RunConfig()) -> list[records.RunRecord]:
    """Splice every encoder into `model` and score it on every task.

    Each task runs all encoders on the same data with the clean pass computed once. One
    record per (task, encoder) is written to `config.output_dir`; a finished record with the
    same config hash is reused instead of recomputed. A task without a language model
    (`Task.needs_model` False, e.g. synthetic) gets the encoder specs and builds them on its own data.

    Args:
        model: preset name, hub id, local path, or an already loaded model; None when no task needs one.
        encoders: spec strings such as 'sae:default', 'identity', 'sae:<path>'.
        tasks: task or preset names such as 'ce_kl'.
    Returns:
        The records, in task-major, encoder order.
    """
    distributed.init_from_env(config.device)
    if distributed.active():
        _check_ranks_agree(model, encoders, tasks, config)
    check_config(config, encoders, tasks)
    task_objs = [(name, resolve_task(name, params_for(name, config.task_params, tasks))) for name in tasks]
    specs = expand_encoder_specs(encoders)
    for spec in specs:
        encoder_class(spec)  # fail on unknown names before loading anything
    needing = [name for name, task in task_objs if task.needs_model]
    if needing and model is None:
        raise SaebenchError(f"task {needing[0]!r} runs on a language model: pass --model (e.g. --model smollm2-135m)")
    for task in (task for _, task in task_objs if not task.needs_model):
        task.check_specs(specs)  # before the model loads or the first task runs
    loaded, groups = None, {}
    if needing:
        loaded = model if isinstance(model, LoadedModel) else load_model(
            model, config.dtype, distributed.rank_device(config.device), config.gguf_file, config.revision)
        _check_context_len(config, loaded)
        if config.hookpoint:
            loaded.hookpoint(config.hookpoint)
        with distributed.main_first("building the encoders"):  # fits run once, on rank 0; the others load them
            groups = build_encoders(encoders, loaded, config)
    out: list[records.RunRecord] = []
    for _, task in task_objs:
        if not task.needs_model:
            out.extend(_run_task(task, None, {}, config, tuple(specs)))
        elif task.multi_hookpoint:
            out.extend(_run_task(task, loaded, groups, config))
        else:
            for hp_name, group in groups.items():
                out.extend(_run_task(task, loaded, {hp_name: group}, config))
    distributed.barrier()  # every record is written when any rank returns
    return out


def _check_ranks_agree(model: str | LoadedModel | None, encoders: Sequence[str], tasks: Sequence[str],
                       config: RunConfig) -> None:
    """Every rank of a data-parallel run must be asked the same thing (else their batches would not add up)."""
    distributed.check_agree("--output", str(Path(config.output_dir).resolve()))
    name = model.name if isinstance(model, LoadedModel) else model
    settings = {k: v for k, v in vars(config).items() if k not in ("output_dir", "device")}
    distributed.check_agree("the run's model, encoders, tasks and settings",
                            json.dumps([name, list(encoders), list(tasks), settings], sort_keys=True, default=str))


def run_settings(config: RunConfig) -> RunSettings:
    """What a task reads of the run's configuration."""
    return RunSettings(config.seed, config.batch_size, config.limit, config.context_len, CorpusSpec(config.corpus),
                       SpliceConfig(config.splice_bos), config.progress and distributed.is_main(), config.reuse_prefix,
                       config.cache_references)


def _run_task(task: Task, model: LoadedModel | None, groups: dict[str, list[Encoder]],
              config: RunConfig, specs: tuple[str, ...] = ()) -> list[records.RunRecord]:
    """Run `task` on the encoders of `groups` (one hookpoint, or several for a multi-hookpoint task),
    or, for a task without a model, on the encoder `specs`."""
    corpus = CorpusSpec(config.corpus)
    single = None if task.multi_hookpoint or model is None else next(iter(groups))
    ctx = TaskContext.create(model, single, run_settings(config), groups=groups, specs=specs)
    base: dict[str, Any] = {"task": {"name": task.spec.name, "version": task.spec.version, "params": task.config(ctx)}}
    if model is None:
        base |= {"model": None, "seed": config.seed}
    else:
        base |= {"model": {"id": model.model_id, "revision": model.revision, "dtype": model.dtype},
                 "corpus": corpus.name, "seed": config.seed, "splice_bos": config.splice_bos}
    todo, done = [], {}
    rows = task.rows(ctx)
    for row in rows:
        cfg = base | {"hookpoint": row.hookpoint, "encoder": row.encoder.to_dict()}
        chash = records.config_hash(cfg)
        path = records.record_path(config.output_dir, task.spec.name, row.encoder.label, chash)
        existing = _finished(path, config)
        if existing is not None:
            done[row.key] = existing
        else:
            todo.append((row, cfg, chash, path))
    if distributed.active():  # rank 0's view of the folder decides, for every rank
        wanted = distributed.broadcast([row.key for row, *_ in todo])
        done |= {row.key: records.read_record(path) for row, _, _, path in todo if row.key not in wanted}
        todo = [t for t in todo if t[0].key in wanted]
    if todo:
        # checkpoints count batches and chunks of whole batches, so they are kept per batch size: a
        # rerun with another --batch-size starts afresh instead of misreading them
        run_key = records.config_hash(base | {"encoders": sorted(c for _, _, c, _ in todo),
                                              "batch_size": config.batch_size})
        partial = Path(config.output_dir) / ".partial" / f"{records.slug(task.spec.name)}-{run_key}.pt"
        # in a data-parallel run rank 0 holds the lock for all ranks (the others would wait on it forever)
        with _exclusive(partial.with_suffix(".lock"), task.spec.name) if distributed.is_main() else nullcontext():
            finished = {row.key: rec for row, _, _, path in todo if (rec := _finished(path, config)) is not None}
            if distributed.broadcast(len(finished) == len(todo)):  # another run wrote them while this one waited
                done |= {row.key: records.read_record(path) for row, _, _, path in todo}
            else:
                done |= _compute(task, ctx, todo, partial, config)
    return [done[row.key] for row in rows]


def _finished(path: Path, config: RunConfig) -> records.RunRecord | None:
    """The finished record at `path` to reuse, if any (none under --no-reuse, or written under a looser
    --max-failed)."""
    existing = records.read_record(path) if config.reuse else None
    if existing is not None and too_many_failed(existing.extra.get("failed_answers"), config.max_failed):
        return None
    return existing


def _compute(task: Task, ctx: TaskContext, todo: list, partial: Path, config: RunConfig) -> dict[str, records.RunRecord]:
    """Run the task for the rows in `todo` and write their records."""
    ctx.store = PartialStore(partial)
    ctx.wanted = frozenset(row.key for row, *_ in todo)
    by_key = {row_key(e.spec.label, hp): e for hp, group in ctx.groups.items() for e in group}
    per_hookpoint = task.needs_model and not task.multi_hookpoint  # results keyed by label, not Row.key
    if per_hookpoint:
        encoders = [e for key, e in by_key.items() if key in ctx.wanted]
    else:
        encoders = list(by_key.values())
    counts_before = {key: answer_counts(e) for key, e in by_key.items()}
    start = time.monotonic()
    results = task.run(ctx, encoders)
    seconds = time.monotonic() - start
    if per_hookpoint:
        results = {row_key(label, ctx.hook.name): result for label, result in results.items()}
    answers = {row.key: task_answers(counts_before[row.key], answer_counts(by_key[row.key]))
               for row, *_ in todo if row.key in by_key}
    if distributed.active():  # each rank asked its own batches' questions
        answers = sum_answers(distributed.gather(answers))
    for row, *_ in todo:  # every encoder checked before any record of the task is written
        if too_many_failed(counts := answers.get(row.key), config.max_failed):
            ctx.store.clear()  # its batches hold the failed answers: a rerun asks them again
            bad = counts["failed"] + counts["unparsed"]
            raise SaebenchError(
                f"{task.spec.name}: {counts['failed']} failed and {counts['unparsed']} unparsed of the "
                f"{counts['asked']} answers of encoder {row.encoder.label!r} ({bad / max(counts['asked'], 1):.1%}, "
                f"more than --max-failed {config.max_failed:.1%}): no record written; first error: "
                f"{counts['first_error']}")
    done = {}
    for row, cfg, chash, path in todo:
        rec = _record(task, ctx.model, row, cfg, chash, results[row.key], seconds, len(todo), config)
        if ctx.warnings:
            rec.extra["warnings"] = list(ctx.warnings)
        if (enc := by_key.get(row.key)) is not None and enc.encode_flops is not None:
            rec.extra["flops"] = {"encode_per_token": enc.encode_flops, "training": enc.training_flops}
        if enc is not None and (report := enc.report()):
            rec.extra["encoder_report"] = report
        if answers.get(row.key) is not None:
            rec.extra["failed_answers"] = answers[row.key]
        if enc is not None and enc.data_used:
            rec.extra["encoder_data"] = enc.data_used
        if distributed.is_main():
            _write(path, rec, results[row.key])
        done[row.key] = rec
    ctx.store.clear()
    return done


@contextmanager
def _exclusive(lock: Path, what: str):
    """Hold an exclusive lock on `lock` (waiting for it): one run at a time computes a given set of records.

    Two runs writing into one output folder never share partial state: runs of other tasks or
    encoders take other locks and go on side by side; a run of the same records waits, then
    reuses what the first one wrote. The lock files are empty and left in place (removing them
    would let a third run lock a new file while a second still holds the old one).
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"saebench: another run is computing the same {what} records in {lock.parent.parent}; "
                  "waiting for it to finish", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record(task: Task, model: LoadedModel | None, row: Row, cfg: dict, chash: str,
            result: TaskResult, seconds: float, n_run: int, config: RunConfig) -> records.RunRecord:
    plugin = distribution_of(ENCODER_GROUP, row.encoder.name)
    # a task without a model says where its data ran (extra.device); the model's device otherwise
    device = str(model.device) if model is not None else result.extra.get("device", "cpu")
    return records.RunRecord(
        task=task.spec.to_dict(),
        encoder=row.encoder.to_dict() | {"plugin": plugin} | ({"display": row.encoder.display} if row.encoder.display else {}),
        model=None if model is None else {"id": model.model_id, "revision": model.revision, "name": model.name,
                                          "dtype": model.dtype},
        hookpoint=row.hookpoint, config=cfg, config_hash=chash,
        metrics=result.metrics, stderr=result.stderr, n=result.n,
        seconds=round(seconds, 3), seed=config.seed,
        saebench_version=records.SAEBENCH_VERSION, git_sha=records.git_sha(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # `seconds` is the wall time of the whole task run, shared by the encoders run together
        extra=result.extra | {"device": device, "torch": torch.__version__, "encoders_in_run": n_run},
    )


def _write(path: Path, rec: records.RunRecord, result: TaskResult) -> None:
    if result.details is not None:
        details = path.with_suffix(".details.jsonl")
        records.write_atomic(details, "".join(json.dumps(row) + "\n" for row in result.details))
        rec.details_file = details.name
    records.write_record(path, rec)
