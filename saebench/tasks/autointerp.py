"""``autointerp``: how good an llm_sim encoder's explanations are, scored on 001's protocols (Paulo et al.,
"Automatically Interpreting Millions of Features in Large Language Models"; EleutherAI's delphi).

For a sample of the SAE's latents, stratified by firing frequency, each scorer (saebench.scorers) is tested on
examples drawn from the corpus's held-out evaluation split (the explainer only ever read the training split):
50 activating 32-token windows, 5 from each activation quantile, and 50 random windows where the latent never
fires (delphi's n_examples_test and n_non_activating). A latent is eligible when it is explained, fires in at
least `min_examples` windows of the scoring sample and is silent in at least `non_activating` of them; every
mean is over the sampled eligible latents, and the record counts the ineligible ones by reason.

Per latent: accuracy, balanced accuracy (delphi's "accuracy"), F1 and, where the judge gives probabilities, AUC,
and accuracy by activation decile (001 Fig. 3c/d: 0 the non-activating examples, 1 the weakest tenth to 10 the
strongest); surprisal and embedding give AUC (surprisal also the accuracy of "the explanation lowers the loss").
Over latents: mean and standard error std/sqrt(latents). The details keep one row per latent, one per example
(its tokens and activations) and one per scorer answer, enough to write delphi's explanations/ and scores/
folders (``saebench latents --delphi``).

The judge is the encoder's simulator: its LLM (cached, retried, failures counted), or with llm=rules the token
rule (saebench.scorers.RuleJudge; surprisal needs an LLM and is then left out, said in extra.not_scored).
"""

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from saebench.capture import latent_sample
from saebench.encoders.base import Encoder
from saebench.errors import SaebenchError
from saebench.latent_examples import N_QUANTILES, LatentWindows, draw
from saebench.scorers import (
    CLASSIFIERS,
    SCORERS,
    Embedder,
    Item,
    LLMJudge,
    RuleJudge,
    classification_metrics,
    decile_accuracy,
    detection_items,
    fuzzing_items,
    score_surprisal,
    shuffled_groups,
)
from saebench.tasks.base import MetricSpec, Task, TaskContext, TaskResult, TaskSpec
from saebench.tasks.simulation_scoring import batches, check_simulating
from saebench.tasks.params import whole

PER_SCORER = {"detection": ("accuracy", "balanced_accuracy", "f1", "auc"),
              "fuzzing": ("accuracy", "balanced_accuracy", "f1", "auc"),
              "surprisal": ("auc", "accuracy"), "embedding": ("auc",),
              "intervention": ("score", "random_explanation", "random_direction")}
SAID = {"accuracy": "share of examples answered right", "balanced_accuracy": "(TPR + TNR) / 2 (delphi's accuracy)",
        "f1": "F1 of the activating (fuzzing: correctly marked) class", "auc": "ROC AUC of the scorer's probability"}
SAID_OTHER = {("surprisal", "auc"): "ROC AUC of the loss drop the explanation brings (activating vs not)",
              ("surprisal", "accuracy"): "share of examples where the explanation lowers the loss iff activating",
              ("embedding", "auc"): "ROC AUC of the example's similarity to the explanation (activating vs not)",
              ("intervention", "score"): "NLL(output explanation | clean) - NLL(... | latent steered), nats",
              ("intervention", "random_explanation"): "the same with another latent's explanation (baseline)",
              ("intervention", "random_direction"): "the same for a random direction, calibrated alike (baseline)"}


def _metric_specs() -> tuple[MetricSpec, ...]:
    out = []
    for scorer, names in PER_SCORER.items():
        for m in names:
            said = SAID_OTHER.get((scorer, m)) or SAID[m]
            out.append(MetricSpec(f"{scorer}_{m}", "higher", f"{scorer}: {said}, mean over the sampled latents"))
    out.append(MetricSpec("n_latents", "none", "latents scored (a frequency-stratified sample of the eligible ones)"))
    out.append(MetricSpec("n_failed", "none", "scorer answers that failed or could not be read (left out)"))
    return tuple(out)


@dataclass(frozen=True)
class AutointerpConfig:
    latents: int = 100
    """Latents scored, a sample stratified by firing frequency (--limit overrides)."""
    scorers: str = "detection,fuzzing,surprisal"
    shown: int = 5
    """Examples per detection/fuzzing prompt (001: five)."""
    test_examples: int = 50
    """Activating examples per latent, n // 10 from each quantile."""
    non_activating: int = 50
    min_examples: int = 50
    """Activating windows a latent needs in the scoring sample to be eligible."""
    sample_tokens: int = 131_072
    """Evaluation-split tokens the scoring examples are drawn from."""
    embedding_model: str = ""
    """A sentence-transformers model name or path (needed by the embedding scorer)."""
    intervention_prompts: int = 10
    """Intervention scoring: prompts the explainer sees, and as many scored (theirs: 10 and 30)."""
    target_kl: float = 1.0
    """Intervention scoring: the KL the steering strength is calibrated to (theirs: 0.1, 0.33, 1, 3)."""


class AutointerpTask(Task):
    """Detection, fuzzing, surprisal and embedding scores of an llm_sim encoder's explanations."""

    spec = TaskSpec(
        name="autointerp",
        version=1,
        headline="detection_balanced_accuracy",
        metrics=_metric_specs(),
        summary=("detection_balanced_accuracy", "fuzzing_balanced_accuracy", "detection_auc", "fuzzing_auc",
                 "surprisal_auc", "embedding_auc", "intervention_score", "n_latents"),
        stderr_method="std/sqrt(latents)",
        limit_unit="items",
    )

    def __init__(self, latents: int = 100, scorers: str = AutointerpConfig.scorers, shown: int = 5,
                 test_examples: int = 50, non_activating: int = 50, min_examples: int = 50,
                 sample_tokens: int = 131_072, embedding_model: str = "", intervention_prompts: int = 10,
                 target_kl: float = 1.0):
        name = self.spec.name
        chosen = [s.strip() for s in str(scorers).split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SCORERS]
        if unknown or not chosen:
            raise SaebenchError(f"autointerp parameter scorers={scorers!r}: {'unknown scorer ' + unknown[0] if unknown else 'none given'}; "
                                f"choose among {', '.join(SCORERS)} (comma-separated)")
        if "embedding" in chosen and not str(embedding_model).strip():
            raise SaebenchError("autointerp scorer embedding needs a sentence-embedding model: "
                                "embedding_model=<sentence-transformers name or local path>")
        tests = whole(name, "test_examples", test_examples, N_QUANTILES)
        self.defaults = AutointerpConfig(
            whole(name, "latents", latents, 1), ",".join(s for s in SCORERS if s in chosen), whole(name, "shown", shown, 1),
            tests, whole(name, "non_activating", non_activating, 1),
            max(tests, whole(name, "min_examples", min_examples, 1)), whole(name, "sample_tokens", sample_tokens, 1024),
            str(embedding_model).strip(), whole(name, "intervention_prompts", intervention_prompts, 2),
            _positive(name, "target_kl", target_kl))

    def settings(self, ctx: TaskContext) -> AutointerpConfig:
        d = asdict(self.defaults)
        if ctx.settings.limit:
            d["latents"] = ctx.settings.limit
        return AutointerpConfig(**d)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        cfg = asdict(self.settings(ctx))
        if "intervention" not in cfg["scorers"]:  # its options change nothing then
            cfg.pop("intervention_prompts"), cfg.pop("target_kl")
        return cfg | {"corpus": ctx.settings.corpus.name, "split": ctx.settings.corpus.split}

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        check_simulating(encoders, self.spec.name)
        cfg = self.settings(ctx)
        for enc in encoders:  # before any work: a scorer the judge cannot run is one line
            llm = getattr(enc.simulator, "llm", None)
            reading = [s for s in ("surprisal", "intervention") if s in cfg.scorers.split(",")]
            if llm is not None and reading and not llm.reads_text:
                raise SaebenchError(f"autointerp scorer {reading[0]} reads the log-probs of given text, which "
                                    f"{llm.label!r} cannot give; use the in-process backend (backend=transformers) "
                                    "or leave it out (scorers=detection,fuzzing)")
        embedder = Embedder(cfg.embedding_model) if "embedding" in cfg.scorers else None
        return {enc.spec.label: self._score(ctx, cfg, enc, embedder) for enc in encoders}

    def _score(self, ctx: TaskContext, cfg: AutointerpConfig, enc: Encoder, embedder: Embedder | None) -> TaskResult:
        inner, seed = enc.inner, ctx.settings.seed
        d = inner.spec.d_latent
        if cfg.latents > d:
            raise SaebenchError(f"autointerp parameter latents={cfg.latents} is more than {inner.spec.label}'s "
                                f"{d} latents")
        hookpoint = ctx.model.hookpoint(ctx.hook.name)
        from saebench.models import cache_dir

        test = latent_sample(ctx.model, inner, hookpoint, cache_dir(), ctx.settings.corpus.name, ctx.settings.batch_size,
                             cfg.sample_tokens, seed=seed, progress=ctx.settings.progress, split=ctx.settings.corpus.split)
        windows = LatentWindows(test, enc.tokenizer)
        train_count = enc.sample.count().float()
        frequency = train_count / enc.sample.positions(ctx.model.bos_id)  # the positions a latent can fire on
        chosen, excluded = _stratified(windows, enc, frequency, cfg, seed)
        enc.explanations.ensure(chosen)  # generated explanations are written for the sampled latents only
        excluded["explanation_failed"] = sum(l not in enc.explanations.texts for l in chosen)
        chosen = [l for l in chosen if l in enc.explanations.texts]
        scorers = cfg.scorers.split(",")
        judge = _judge(enc, cfg)
        llm = getattr(enc.simulator, "llm", None)
        not_scored = {} if llm is not None else {
            s: "the rule simulator has no language model to read text with"
            for s in ("surprisal", "intervention") if s in scorers}
        explanations = enc.explanations.texts
        state: dict[str, list] = {"items": [], "intervention": []}
        for sl, part in batches(ctx, len(chosen), state, f"scoring explanations of {enc.spec.label}",
                                lambda: {"items": [], "intervention": []}):
            part["items"].extend(_score_latents(chosen[sl], windows, cfg, scorers, judge, llm, embedder, explanations,
                                                seed, not_scored))
            if "intervention" in scorers and "intervention" not in not_scored:
                from saebench.tasks.intervention import score_latents

                rows = judge.counted(lambda: score_latents(
                    ctx.hook.forward, inner.W_dec.detach().cpu(), windows, chosen[sl], enc.tokenizer, llm,
                    cfg.intervention_prompts, cfg.target_kl, 8, seed))
                part["intervention"].extend(rows.items())
        items: list[tuple[str, Item]] = state["items"]
        return _result(chosen, items, windows, frequency, explanations, scorers, excluded, not_scored, judge, cfg,
                       dict(state["intervention"]))


def _judge(enc: Encoder, cfg: AutointerpConfig):
    llm = getattr(enc.simulator, "llm", None)
    if llm is not None:  # answers counted as the encoder's (the runner refuses a record with too many failed)
        return LLMJudge(llm, cfg.shown, enc.simulator.counted)
    tokens = enc.explanations.tokens
    if tokens is None:
        raise SaebenchError("autointerp with llm=rules scores token-list explanations: use explanations=tokens")
    return RuleJudge(tokens)


def _stratified(windows: LatentWindows, enc: Encoder, frequency: torch.Tensor, cfg: AutointerpConfig,
                seed: int) -> tuple[list[int], dict[str, int]]:
    """`cfg.latents` eligible latents: the eligible ones ordered by training-split frequency, cut into ten equal
    strata, the same number drawn at random from each (the remainder from the largest strata)."""
    d = len(frequency)
    from saebench.encoders.llm_sim_options import NEVER_ACTIVE

    texts = enc.explanations.texts
    sample, nw = windows.sample, windows.n_windows
    pairs = torch.unique(_latent_of_rows(sample) * nw + sample.rows // windows.window)
    n_act = torch.bincount(pairs // nw, minlength=d)
    excluded = {"unexplained": 0, "too_few_activating": 0, "too_few_non_activating": 0}
    eligible = []
    for latent in range(d):
        if latent not in enc.explanations.pending and texts.get(latent, NEVER_ACTIVE) == NEVER_ACTIVE:
            excluded["unexplained"] += 1
        elif int(n_act[latent]) < cfg.min_examples:
            excluded["too_few_activating"] += 1
        elif windows.n_windows - int(n_act[latent]) < cfg.non_activating:
            excluded["too_few_non_activating"] += 1
        else:
            eligible.append(latent)
    if len(eligible) < cfg.latents:
        raise SaebenchError(f"autointerp: only {len(eligible)} of {enc.inner.spec.label}'s {d} latents are eligible "
                            f"({excluded['unexplained']} unexplained, {excluded['too_few_activating']} fire in fewer than "
                            f"{cfg.min_examples} windows of the {cfg.sample_tokens}-token scoring sample); ask for "
                            f"latents={len(eligible)} or fewer, or raise sample_tokens")
    eligible.sort(key=lambda l: (float(frequency[l]), l))
    strata = np.array_split(np.array(eligible), N_QUANTILES)
    rng = random.Random(seed)
    want = [cfg.latents // N_QUANTILES + (i < cfg.latents % N_QUANTILES) for i in range(N_QUANTILES)]
    picked = [l for s, n in zip(strata, want) for l in rng.sample(s.tolist(), min(n, len(s)))]
    return sorted(picked), excluded | {"eligible": len(eligible)}


def _latent_of_rows(sample) -> torch.Tensor:
    """The latent of each of the sample's activations (rows are grouped by latent)."""
    return torch.repeat_interleave(torch.arange(sample.d_latent), sample.count())


def _score_latents(latents, windows, cfg, scorers, judge, llm, embedder, explanations, seed, not_scored):
    """(scorer, item) for every example each scorer saw, for a batch of latents."""
    out: list[tuple[str, Item]] = []
    per: dict[str, list[Item]] = {s: [] for s in scorers}
    for latent in latents:
        test = draw(windows.quantiles(latent), cfg.test_examples, "quantiles", seed + latent)
        negatives = windows.non_activating(latent, cfg.non_activating, seed)
        for s in scorers:
            if s == "fuzzing":
                per[s] += fuzzing_items(latent, test, negatives, seed)
            elif s not in not_scored and s != "intervention":
                per[s] += detection_items(latent, test, negatives)
    for kind in CLASSIFIERS:
        if kind in per:
            by_latent: dict[int, list[Item]] = {}
            for it in per[kind]:
                by_latent.setdefault(it.latent, []).append(it)
            groups = [g for latent, its in by_latent.items()
                      for g in shuffled_groups(its, cfg.shown, seed * 104_729 + latent)]
            judge.judge(kind, explanations, groups)
    if "surprisal" in per and per["surprisal"]:
        judge.counted(lambda: score_surprisal(llm, explanations, per["surprisal"]))
    if "embedding" in per and per["embedding"]:
        embedder.score(explanations, per["embedding"])
    for s in scorers:
        out += [(s, it) for it in per[s]]
    return out


def _result(latents, items, windows, frequency, explanations, scorers, excluded, not_scored, judge, cfg,
            intervention: dict[int, dict[str, Any]]) -> TaskResult:
    by: dict[tuple[str, int], list[Item]] = {}
    for s, it in items:
        by.setdefault((s, it.latent), []).append(it)
    rows, curves_acc = [], {s: {} for s in CLASSIFIERS if s in scorers}
    for latent in latents:
        row: dict[str, Any] = {"kind": "latent", "latent": latent, "frequency": float(frequency[latent]),
                               "explanation": explanations[latent], "activating_windows": windows.n_activating(latent)}
        row |= intervention.get(latent, {})
        for s in scorers:
            its = by.get((s, latent), [])
            if not its:
                continue
            m = classification_metrics(its)
            for name in PER_SCORER[s]:
                row[f"{s}_{name}"] = m[name]
            row[f"{s}_n_failed"] = m["n_failed"]
            if s in curves_acc:
                for dec, acc in decile_accuracy(its).items():
                    row[f"{s}_decile_{dec}"] = acc
                    curves_acc[s].setdefault(dec, []).append(acc)
        rows.append(row)
    metrics, stderr, n = {}, {}, {}
    for spec in _metric_specs():
        vals = [r[spec.name] for r in rows if r.get(spec.name) is not None]
        if spec.name in ("n_latents", "n_failed"):
            continue
        metrics[spec.name], stderr[spec.name], n[spec.name] = _mean_se(vals)
    metrics["n_latents"], stderr["n_latents"], n["n_latents"] = float(len(rows)), None, len(rows)
    failed = sum(r.get(f"{s}_n_failed", 0) for r in rows for s in scorers)
    metrics["n_failed"], stderr["n_failed"], n["n_failed"] = float(failed), None, len(items)
    decile_rows = []
    for dec in range(N_QUANTILES + 1):
        point: dict[str, Any] = {"curve": "decile", "x": dec}
        for s, acc in curves_acc.items():
            m, se, _ = _mean_se(acc.get(dec, []))
            point[f"{s}_accuracy"], point[f"{s}_accuracy_se"] = m, se
        decile_rows.append(point)
    details = decile_rows + rows + _example_rows(items)
    extra = {"curves": {"decile": {"x": "decile", "plot": "line",
                                   "metrics": [f"{s}_accuracy" for s in curves_acc]}},
             "excluded": excluded, "not_scored": not_scored, "judge": judge.label, "shown": cfg.shown}
    return TaskResult(metrics, stderr, n, details, extra)


def _example_rows(items: list[tuple[str, Item]]) -> list[dict[str, Any]]:
    """One row per (latent, window) with its text and activations, one per scorer answer."""
    seen, rows = set(), []
    for s, it in items:
        e = it.example
        if (it.latent, e.window, e.quantile) not in seen:
            seen.add((it.latent, e.window, e.quantile))
            rows.append({"kind": "example", "latent": it.latent, "window": e.window, "quantile": e.quantile,
                         "str_tokens": e.str_tokens, "activations": e.activations})
        answer = {"kind": "answer", "scorer": s, "latent": it.latent, "window": e.window, "quantile": e.quantile,
                  "label": it.label, "prediction": it.prediction, "probability": it.probability}
        if it.marks is not None:
            answer["marks"] = sorted(it.marks)
        if it.extra:
            answer |= {k: [round(x, 4) for x in v] for k, v in it.extra.items()}
        rows.append(answer)
    return rows


def _positive(task: str, name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not v > 0 or not math.isfinite(v):
        raise SaebenchError(f"{task} parameter {name}={value!r}: give a positive number")
    return v


def _mean_se(values: list[float]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    mean = float(np.mean(v))
    se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return mean, se, len(v)
