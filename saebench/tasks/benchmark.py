"""What the benchmark tasks (lambada, cbt, lm_eval:<task>) share.

Each task scores items (a question, a passage) in several passes over the same data: clean,
zero ablation, and every encoder spliced in. A pass yields `ItemScores`; `compare` turns a
spliced pass plus the clean and zero passes into one encoder's `TaskResult`, with per-item
details and the per-feature helpful/harmful scores of Anders & Bloom (plus a frequency-controlled one).
Each item's details row also holds the encoder's reconstruction MSE, L0 and the activation norm ||x|| at
the hookpoint, averaged over the prompt's positions (Anders & Bloom average them "over context"), and
which of their four correctness classes the item falls in.
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench import distributed
from saebench.encoders.base import Encoder
from saebench.encoders.baselines import ZeroEncoder
from saebench.models import cache_dir
from saebench.stats import ratio_and_se
from saebench.tasks.base import MetricSpec, PartialStore, TaskContext, TaskResult, TaskSpec
from saebench.tasks.params import whole
from saebench.tasks.reference import model_fingerprint, pass_entry

TOP_FEATURES = 20
"""How many most helpful / most harmful latents a record lists."""
MIN_PROMPTS_RANKED = 20
"""Latents active on fewer prompts are not ranked: their difference of means is mostly noise (on
full LAMBADA, a latent active on one prompt ranked 2nd most harmful). The details keep them all."""
BOOTSTRAP_SAMPLES = 1000
"""Resamples of the paired bootstrap for the standard error of delta_acc."""
OUTCOMES = {(True, True): "both_correct", (False, False): "both_wrong", (True, False): "only_clean_correct",
            (False, True): "only_spliced_correct"}
"""An item's class by (correct clean, correct spliced): the four classes of Anders & Bloom's scatter plots."""

BENCHMARK_METRICS = (
    MetricSpec("acc", "higher", "accuracy with the encoder spliced in"),
    MetricSpec("acc_clean", "none", "accuracy of the clean model"),
    MetricSpec("acc_zero", "none", "accuracy with the hookpoint zero-ablated"),
    MetricSpec("delta_acc", "higher", "acc - acc_clean; standard error from a paired bootstrap over items"),
    MetricSpec("delta_acc_zero", "none", "acc_zero - acc_clean (paired bootstrap standard error)"),
    MetricSpec("delta_logp", "higher", "mean over items of log p(answer) spliced - clean"),
    MetricSpec("ce_prompt", "lower", "mean CE over prompt tokens (attention sinks excluded), spliced"),
    MetricSpec("ce_prompt_clean", "none", "mean CE over prompt tokens, clean"),
    MetricSpec("ce_prompt_zero", "none", "mean CE over prompt tokens, zero-ablated"),
)
BENCHMARK_STDERR = ("over items (sample std / sqrt n; prompt CE as a ratio clustered by item); delta_acc and "
                    "delta_acc_zero by a paired bootstrap over items")
BENCHMARK_SUMMARY = ("acc", "acc_clean", "acc_zero", "delta_acc", "delta_logp", "ce_prompt", "ce_prompt_clean")


@dataclass
class ItemScores:
    """One pass (clean, zero, or an encoder) over n items."""

    correct: Tensor
    """(n,) 1.0 where the item was answered correctly."""
    logp: Tensor
    """(n,) log p(answer) under the task's protocol."""
    ce_sum: Tensor
    """(n,) summed next-token NLL over the item's prompt tokens."""
    ce_count: Tensor
    """(n,) prompt tokens in ce_sum."""
    features: Tensor | None = None
    """(pairs, 2) unique (item, latent) pairs: latent active in the item's last
    prompt_recorder.FEATURE_WINDOW prompt positions."""
    aggregates: dict[str, float | None] = field(default_factory=dict)
    """Task-level metrics of this pass (e.g. lm-eval's perplexity)."""
    per_item: dict[str, list] = field(default_factory=dict)
    """Per-item values the aggregates are computed from (e.g. lm-eval's process_results)."""
    at_hookpoint: dict[str, Tensor] = field(default_factory=dict)
    """(n,) float64 per item, at the hookpoint, over the prompt's spliced positions (attention sinks
    excluded): 'n_positions' (how many; 0 for a pass that splices nothing), and the means over them of
    'mse' (||x - x_hat||^2 / d_in), 'norm' (||x||) and, for encoders with latents, 'l0'."""

    def take(self, index: list[int]) -> "ItemScores":
        """The scores with items reordered: new item j is old item index[j]."""
        idx = torch.tensor(index, dtype=torch.long)
        feats = None
        if self.features is not None:
            new_of_old = torch.empty_like(idx)
            new_of_old[idx] = torch.arange(len(idx))
            feats = torch.stack([new_of_old[self.features[:, 0]], self.features[:, 1]], 1)
        return ItemScores(self.correct[idx], self.logp[idx], self.ce_sum[idx], self.ce_count[idx], feats,
                          dict(self.aggregates), {k: [v[i] for i in index] for k, v in self.per_item.items()},
                          {k: v[idx] for k, v in self.at_hookpoint.items()})


CHECKPOINT_ITEMS = 64
"""Items per checkpoint of a benchmark pass: each chunk of a pass is saved once finished, and an
interrupted run recomputes only unfinished chunks. Uninterrupted runs use the same chunks, so
a resumed run's numbers equal an uninterrupted one's exactly. The chunks are also what the ranks of a
data-parallel run share out (one each per round), so they stay small enough to go round: Lambada's 1,000
questions make 16."""


def concat_scores(parts: list[ItemScores]) -> ItemScores:
    """Scores of consecutive chunks of items as one pass (features renumbered to global items)."""
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part.correct))
    feats = None
    if parts and parts[0].features is not None:
        feats = torch.cat([p.features + torch.tensor([off, 0]) for p, off in zip(parts, offsets)])
    per_item: dict[str, list] = {}
    for part in parts:
        for name, values in part.per_item.items():
            per_item.setdefault(name, []).extend(values)
    at_hookpoint = {k: torch.cat([p.at_hookpoint[k] for p in parts]) for k in (parts[0].at_hookpoint if parts else {})}
    return ItemScores(*(torch.cat([getattr(p, f) for p in parts]) for f in ("correct", "logp", "ce_sum", "ce_count")),
                      feats, {}, per_item, at_hookpoint)


def pass_stores(ctx: TaskContext, task: TaskSpec, config: dict[str, Any], items: object,
                passes: dict[str, Encoder | None]) -> dict[str, PartialStore]:
    """Where each of `passes` (`benchmark_passes`) keeps its finished chunks: the clean pass and the zero ablation in
    the reference cache, reused by every later run of `task` with the same model, items and settings whatever
    encoders it scores (the clean pass at every hookpoint: nothing is spliced in it); an encoder's pass, or any pass
    under --no-reference-cache, in the run's own checkpoint store.

    Args:
        config: the task's configuration for this run (`Task.config`: data file and its checksum, items, ...).
        items: what the passes score, in order (the requests, the token ids): its sha256 is in the key, so an
            edited task template or another dataset revision under the same configuration gets its own entry.
    """
    stores = {label: ctx.store for label in passes}
    cached = [label for label, enc in passes.items() if enc is None or isinstance(enc, ZeroEncoder)]
    if not ctx.settings.cache_references or not cached:
        return stores
    import transformers

    model = ctx.model
    base = {"version": task.version, "config": config,
            "items_sha256": hashlib.sha256(repr(items).encode()).hexdigest(),
            "model": model.model_id, "revision": model.revision, "dtype": model.dtype,
            "device": torch.device(model.device).type, "batch_size": ctx.settings.batch_size,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "probe_sha256": model_fingerprint(model)}
    for label in cached:
        which = ({"pass": "clean"} if passes[label] is None else
                 {"pass": "zero", "hookpoint": ctx.hook.name, "splice": asdict(ctx.settings.splice)})
        stores[label] = pass_entry(cache_dir(), task.name, base | which)
    return stores


def resumable_pass(ctx: TaskContext, name: str, n_items: int,
                   score_chunk: Callable[[range, Callable[[int], object]], ItemScores], desc: str,
                   chunks: list[range] | None = None, store: PartialStore | None = None) -> ItemScores:
    """One pass over n items in chunks (default: CHECKPOINT_ITEMS items each), each saved to
    `store` (default ctx.store) once done.

    Args:
        name: identifies the pass among the run's passes (e.g. 'clean', an encoder label).
        score_chunk: scores items `range` (a chunk), with item numbers in its result counted
            from the chunk's start; its second argument advances the progress bar by n items
            (optional to call: the bar is topped up when the chunk is done).
        chunks: consecutive ranges covering 0..n_items, when the task needs its own boundaries.
        store: where the chunks are kept (`pass_stores`).
    """
    store = ctx.store if store is None else store
    key = hashlib.sha256(name.encode()).hexdigest()[:12]
    if chunks is None:
        chunks = [range(s, min(s + CHECKPOINT_ITEMS, n_items)) for s in range(0, n_items, CHECKPOINT_ITEMS)]
    size, me = distributed.world_size(), distributed.rank()
    parts = []
    with tqdm(total=n_items, desc=desc, unit="item", disable=not ctx.settings.progress) as bar:
        # in rounds of one chunk per rank (one process: one chunk per round); every rank ends with every part
        for first in range(0, len(chunks), size):
            names = [f"{key}-{items.start}-{items.stop}" for items in chunks[first:first + size]]
            stored = [store.load_piece(piece) for piece in names]  # collective: the same order on every rank
            before = bar.n
            mine = None
            if me < len(names) and stored[me] is None:
                mine = score_chunk(chunks[first + me], bar.update)
            for j, computed in enumerate(distributed.gather(mine)[:len(names)]):
                if stored[j] is None:
                    store.save_piece(names[j], computed)  # rank 0 writes
                parts.append(stored[j] if stored[j] is not None else computed)
            bar.update(sum(len(items) for items in chunks[first:first + size]) - (bar.n - before))
    return concat_scores(parts)


def checked_items(task: str, value: int | str | None) -> int | None:
    """A task's `items` parameter (an int, or text from '?items=N'): a positive count, or None for all items."""
    return None if value is None else whole(task, "items", value, 1)


def item_limit(ctx: TaskContext, items: int | None) -> int | None:
    """How many items a run scores: --limit when given, else the task's `items` (None: all)."""
    return ctx.settings.limit if ctx.settings.limit is not None else items


def benchmark_passes(ctx: TaskContext, encoders: list[Encoder]) -> dict[str, Encoder | None]:
    """The passes to run, prepared: 'clean' (None), 'zero' (the user's zero if given), then each encoder."""
    zero = next((e for e in encoders if e.spec.name == "zero"), ZeroEncoder(ctx.model.d_model, ctx.hook.name))
    passes: dict[str, Encoder | None] = {"clean": None, "zero": zero} | {e.spec.label: e for e in encoders}
    for enc in passes.values():
        if enc is not None:
            enc.prepare(ctx.hook)
    return passes


def mean_and_se(x: Tensor) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample std / sqrt n, as lm-eval's mean_stderr)."""
    x = x.double()
    if x.numel() == 0:
        return None, None
    se = (x.std(unbiased=True) / math.sqrt(x.numel())).item() if x.numel() > 1 else None
    return x.mean().item(), se


def paired_bootstrap_se(a: Tensor, b: Tensor, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> float | None:
    """Standard error of mean(a) - mean(b) over items, resampling items with both values kept together."""
    n = a.numel()
    if n < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=gen)
    diff = (a.double() - b.double())[idx].mean(1)
    return diff.std(unbiased=True).item()


def feature_scores(pairs: Tensor, delta: Tensor, d_latent: int) -> list[dict[str, Any]]:
    """Helpful/harmful scores of every latent active on at least one prompt.

    Over the prompts where the latent is active: mean delta log p(answer) and Anders & Bloom's
    count score = #(delta >= 0) - #(delta < 0). The count score mostly measures how often a latent
    fires (a latent active on every prompt scores the global count), so beside it the
    frequency-controlled score: mean delta where the latent is active minus mean delta where it
    is not, with its Welch standard error (None where either side has fewer than 2 prompts; the
    difference itself None where the latent is active on every prompt).
    """
    item, latent = pairs[:, 0], pairs[:, 1]
    d = delta.double()[item]
    count = torch.bincount(latent, minlength=d_latent)
    helped = torch.bincount(latent, weights=(d >= 0).double(), minlength=d_latent)
    total = torch.bincount(latent, weights=d, minlength=d_latent)
    total_sq = torch.bincount(latent, weights=d * d, minlength=d_latent)
    n_all, sum_all, sq_all = len(delta), delta.double().sum().item(), (delta.double() ** 2).sum().item()
    rows = []
    for f in count.nonzero().squeeze(1).tolist():
        n = int(count[f])
        controlled, se = _active_minus_inactive(n, total[f].item(), total_sq[f].item(),
                                                n_all - n, sum_all - total[f].item(), sq_all - total_sq[f].item())
        rows.append({"kind": "feature", "feature": f, "n_prompts": n, "mean_delta_logp": total[f].item() / n,
                     "score": int(2 * helped[f].item() - n), "controlled_delta_logp": controlled,
                     "controlled_se": se})
    return rows


def _active_minus_inactive(n_a: int, s_a: float, q_a: float, n_i: int, s_i: float,
                           q_i: float) -> tuple[float | None, float | None]:
    """Difference of two means from their counts, sums and sums of squares, and its Welch SE."""
    if n_a == 0 or n_i == 0:
        return None, None
    diff = s_a / n_a - s_i / n_i
    if n_a < 2 or n_i < 2:
        return diff, None
    var_a = max(q_a - s_a * s_a / n_a, 0.0) / (n_a - 1)
    var_i = max(q_i - s_i * s_i / n_i, 0.0) / (n_i - 1)
    return diff, math.sqrt(var_a / n_a + var_i / n_i)


def top_features(rows: list[dict[str, Any]], k: int = TOP_FEATURES,
                 min_prompts: int = MIN_PROMPTS_RANKED) -> dict[str, list[dict[str, Any]]]:
    """The k most helpful and k most harmful latents by the frequency-controlled score.

    Ranked: latents active on at least `min_prompts` prompts and inactive on at least 2 (so the
    score and its standard error exist). The rest stay in the details rows, unranked.
    """
    def brief(r):
        return {key: r[key] for key in ("feature", "controlled_delta_logp", "controlled_se", "score", "n_prompts",
                                        "mean_delta_logp")}

    ranked = sorted((r for r in rows if r["controlled_se"] is not None and r["n_prompts"] >= min_prompts),
                    key=lambda r: (r["controlled_delta_logp"], r["score"]))
    return {"most_helpful": [brief(r) for r in ranked[::-1][:k]], "most_harmful": [brief(r) for r in ranked[:k]],
            "ranked_by": "controlled_delta_logp", "min_prompts": min_prompts}


def compare(spliced: ItemScores, clean: ItemScores, zero: ItemScores, encoder: Encoder, seed: int,
            items: list[dict[str, Any]]) -> TaskResult:
    """One encoder's result: its pass against the clean and zero-ablation passes of the same items.

    Args:
        items: per-item identification (id, target, ...) copied into the details rows.
    """
    n = len(items)
    delta = spliced.logp - clean.logp
    out: dict[str, tuple[float | None, float | None]] = {
        "acc": mean_and_se(spliced.correct),
        "acc_clean": mean_and_se(clean.correct),
        "acc_zero": mean_and_se(zero.correct),
        "delta_acc": ((spliced.correct - clean.correct).double().mean().item() if n else None,
                      paired_bootstrap_se(spliced.correct, clean.correct, seed)),
        "delta_acc_zero": ((zero.correct - clean.correct).double().mean().item() if n else None,
                           paired_bootstrap_se(zero.correct, clean.correct, seed)),
        "delta_logp": mean_and_se(delta),
        "ce_prompt": ratio_and_se(spliced.ce_sum, spliced.ce_count),
        "ce_prompt_clean": ratio_and_se(clean.ce_sum, clean.ce_count),
        "ce_prompt_zero": ratio_and_se(zero.ce_sum, zero.ce_count),
    }
    for name, value in spliced.aggregates.items():
        out[name] = (value, None)
    for name, value in clean.aggregates.items():
        out[f"{name}_clean"] = (value, None)
    details = [info | _item_row(i, spliced, clean, zero) for i, info in enumerate(items)]
    extra: dict[str, Any] = {"items": n}
    if encoder.has_latents and spliced.features is not None and encoder.spec.d_latent:
        rows = feature_scores(spliced.features, delta, encoder.spec.d_latent)
        details += rows
        extra["features"] = top_features(rows)
    n_tokens = int(spliced.ce_count.sum().item())
    return TaskResult(
        metrics={k: v[0] for k, v in out.items()},
        stderr={k: v[1] for k, v in out.items()},
        n={k: (n_tokens if k.startswith("ce_prompt") else n) if v[0] is not None else None for k, v in out.items()},
        details=details, extra=extra,
    )


def _item_row(i: int, spliced: ItemScores, clean: ItemScores, zero: ItemScores) -> dict[str, Any]:
    """Item i's details row: correctness and log p(answer) of the three passes, Δ log p, the spliced prompt
    CE, the spliced pass's per-item means at the hookpoint (None where no position was spliced) and the
    item's correctness class."""
    right, right_clean = bool(spliced.correct[i]), bool(clean.correct[i])
    row: dict[str, Any] = {
        "kind": "item", "correct": right, "correct_clean": right_clean, "correct_zero": bool(zero.correct[i]),
        "logp": spliced.logp[i].item(), "logp_clean": clean.logp[i].item(), "logp_zero": zero.logp[i].item(),
        "delta_logp": (spliced.logp[i] - clean.logp[i]).item(),
        "ce_prompt": (spliced.ce_sum[i] / spliced.ce_count[i]).item() if spliced.ce_count[i] else None,
        "outcome": OUTCOMES[(right_clean, right)]}
    if spliced.at_hookpoint:
        n = int(spliced.at_hookpoint["n_positions"][i])
        row["n_positions"] = n
        for name in ("mse", "l0", "norm"):
            if name in spliced.at_hookpoint:
                row[name] = spliced.at_hookpoint[name][i].item() if n else None
    return row
