"""lm-eval tasks with an encoder in the loop: `lm_eval:<task>`, `lambada`, `lambada_first_token`.

lm-eval builds the requests and scores the responses (its own `process_results` and
aggregations); saebench's `SplicedLM` answers them, once clean, once zero-ablated and once
per encoder, on the same requests. A `_RequestObserver` rides along each forward pass to find
which item each (reordered, right-padded) batch row holds, for prompt CE and active latents.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from saebench.encoders.base import Encoder
from saebench.errors import SaebenchError
from saebench.lm_eval_plugin import lm_eval_version_problem
from saebench.tasks.base import MetricSpec, Task, TaskContext, TaskResult, TaskSpec
from saebench.tasks.lm_eval_data import check_json_data_file, file_sha256, load_lm_eval_task
from saebench.tasks import benchmark
from saebench.tasks.benchmark import (BENCHMARK_METRICS, BENCHMARK_STDERR, BENCHMARK_SUMMARY, ItemScores,
                                      benchmark_passes, checked_items, compare, item_limit, pass_stores,
                                      resumable_pass)
from saebench.tasks.prompt_recorder import PromptRecorder


@dataclass(frozen=True)
class LMEvalConfig:
    """Effective parameters of an lm-eval task run (hashed into records)."""

    lm_eval_task: str
    """lm-eval task name, or path of a task YAML."""
    include_path: str | None
    """Extra folder of lm-eval task YAMLs (lm-eval's --include_path)."""
    data_file: str | None
    """Local JSON/JSONL replacing the task's evaluation split (e.g. lambada_test.jsonl)."""
    data_sha256: str | None
    items: int | None
    """First N documents (lm-eval's --limit: saebench's --limit, else the preset's items); None for all."""
    protocol: str
    """'lm_eval' (the task's own acc) or 'first_token' (argmax at the last prompt position)."""
    lm_eval_version: str


class _RequestObserver(PromptRecorder):
    """Finds the item of each row lm-eval feeds the model, by the row's tokens.

    HFLM sorts requests by length, batches them, right-pads with 0 and may merge requests that
    share their input; the exact input of every request (context + continuation, minus the last
    token, left-truncated to max_length) is known from its tokenisation, so a row's tokens
    identify it.
    """

    def __init__(self, item_of_request: list[int], n_items: int, bos_id: int, max_length: int,
                 collect_features: bool, first_tokens: Tensor | None = None):
        super().__init__(n_items, bos_id, collect_features)
        self.item_of_request, self.max_length = item_of_request, max_length
        self.first_tokens = first_tokens
        self.first_correct = torch.zeros(n_items)
        self.first_logp = torch.zeros(n_items, dtype=torch.float64)
        self._keys: dict[tuple[int, ...], tuple[int, int]] = {}
        self._aliases: dict[int, set[int]] = {}

    def tokenized(self, requests) -> None:
        for r, (_, ctx_enc, cont_enc) in enumerate(requests):
            inp = tuple((ctx_enc + cont_enc)[-(self.max_length + 1):][:-1])
            item = self.item_of_request[r]
            if inp not in self._keys:
                self._keys[inp] = (item, max(1, len(inp) - len(cont_enc) + 1))
            elif (first := self._keys[inp][0]) != item:
                # lm-eval runs identical inputs once (one-token continuations are looked up in
                # the same row), so the other items get copies of the first one's prompt stats
                self._aliases.setdefault(first, set()).add(item)

    def start(self, token_ids: Tensor) -> None:
        self.set_rows([self._lookup(row) for row in token_ids.tolist()], token_ids.shape[1])

    def _lookup(self, row: list[int]) -> tuple[int, int]:
        end = len(row)
        while end > 0 and row[end - 1] == 0:
            end -= 1
        for length in range(end, len(row) + 1):  # a request may itself end in token 0
            if (hit := self._keys.get(tuple(row[:length]))) is not None:
                return hit
        raise RuntimeError("a batch row from lm-eval matches none of the task's requests")

    def copy_aliases(self) -> None:
        """Give items whose input duplicated another item's the stats recorded for that item."""
        for first, others in self._aliases.items():
            for item in others:
                for stat in (self.ce_sum, self.ce_count, self.first_correct, self.first_logp, self.recorded,
                             *self.at_hookpoint.values()):
                    stat[item] = stat[first]
                if self._pairs:
                    pairs = torch.cat(self._pairs)
                    mine = pairs[pairs[:, 0] == first]
                    self._pairs.append(torch.stack([torch.full_like(mine[:, 0], item), mine[:, 1]], 1))

    def finish(self, token_ids: Tensor, logits: Tensor) -> None:
        if self.first_tokens is not None:
            for b, row in enumerate(self._rows):
                if row is not None:
                    item, plen = row
                    logp = torch.log_softmax(logits[b, plen - 1].float(), -1).cpu()
                    target = int(self.first_tokens[item])
                    self.first_correct[item] = float(int(logp.argmax()) == target)
                    self.first_logp[item] = logp[target].item()
        self.record_logits(token_ids, logits)


def _batching_plan(lm, instances, doc_ids: list[int], batch_size: int,
                   chunk_rows: int) -> tuple[list[int], list[range]]:
    """Items (indices into doc_ids) in the order lm-eval's HFLM runs their requests, and chunks of them.

    HFLM sorts a call's requests longest first (key: -len(tokens), tokens), runs requests whose
    model input is the same (context + continuation[:-1]) as one row, and batches the rows in that
    order. Taking documents in the same order, and cutting chunks only where the rows so far fill
    whole batches and before a document with a row of its own, each chunk runs in exactly the
    batches one call over all requests would make (for tasks with one request per document, such
    as lambada; a document with several requests sorts by its longest and may not).
    """
    encoded = lm.encoded_requests(instances)
    key_of: dict[int, tuple] = {}
    rows_by_doc: dict[int, set[tuple]] = {}
    for inst, (_, ctx_ids, cont_ids) in zip(instances, encoded):
        toks = ctx_ids + cont_ids
        key = (-len(toks), tuple(toks))
        key_of[inst.doc_id] = min(key_of.get(inst.doc_id, key), key)
        rows_by_doc.setdefault(inst.doc_id, set()).add(tuple(toks[:-1]))
    order = sorted(range(len(doc_ids)), key=lambda k: key_of[doc_ids[k]])
    chunks, start, rows, seen = [], 0, 0, set()
    for pos, k in enumerate(order):
        new = rows_by_doc[doc_ids[k]] - seen
        if new and rows >= chunk_rows and rows % batch_size == 0:
            chunks.append(range(start, pos))
            start, rows = pos, 0
        seen |= new
        rows += len(new)
    chunks.append(range(start, len(order)))
    return order, chunks


class LMEvalTask(Task):
    """Any lm-eval loglikelihood or multiple-choice task, scored clean, zero-ablated and spliced."""

    # v2: details rows hold each item's MSE / L0 / ||x|| at the hookpoint and its correctness class
    spec = TaskSpec("lm_eval", 2, "acc", BENCHMARK_METRICS, BENCHMARK_SUMMARY, BENCHMARK_STDERR, "items")
    protocol = "lm_eval"
    data_fields: tuple[str, ...] = ()
    """Fields every row of a --data-file must have, checked before any model work."""

    def __init__(self, lm_eval_task: str | None = None, include_path: str | None = None,
                 data_file: str | None = None, arg: str | None = None, items: int | str | None = None):
        """
        Args:
            lm_eval_task: lm-eval task name or YAML path (`--task lm_eval:<task>` passes it as `arg`).
            include_path: folder of extra lm-eval task YAMLs.
            data_file: local JSON/JSONL replacing the task's evaluation split.
            items: first N documents when --limit is not given (a preset's protocol); None for all.
        """
        self.items = checked_items(self.spec.name, items)
        if (problem := lm_eval_version_problem()) is not None:
            raise SaebenchError(problem)
        name = arg or lm_eval_task
        if not name:
            raise SaebenchError("lm_eval needs a task name: --task lm_eval:<lm-eval task>")
        check_json_data_file(data_file, self.data_fields)
        self.lm_eval_task, self.include_path, self.data_file = name, include_path, data_file
        if type(self) is LMEvalTask:
            self.spec = replace(LMEvalTask.spec, name=f"lm_eval:{name}")

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        import lm_eval

        return asdict(LMEvalConfig(self.lm_eval_task, self.include_path, self.data_file,
                                   file_sha256(self.data_file), item_limit(ctx, self.items), self.protocol,
                                   lm_eval.__version__))

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        from saebench.tasks.spliced_lm import SplicedLM

        task = load_lm_eval_task(self.lm_eval_task, self.include_path, self.data_file)
        task.build_all_requests(limit=item_limit(ctx, self.items), rank=0, world_size=1)
        instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
        bad = {i.request_type for i in instances} - {"loglikelihood"}
        if bad:
            raise SaebenchError(f"lm-eval task {self.lm_eval_task!r} makes {', '.join(sorted(bad))} requests; "
                                "saebench splices loglikelihood and multiple-choice tasks only")
        doc_ids = sorted({i.doc_id for i in instances})
        rows_of: dict[int, list[int]] = {}
        for r, inst in enumerate(instances):
            rows_of.setdefault(inst.doc_id, []).append(r)
        lm = SplicedLM(ctx.model, batch_size=ctx.settings.batch_size)
        lm.hookpoint, lm.splice_config = ctx.hook.hookpoint, ctx.settings.splice
        first = self._first_tokens(lm, task, instances, doc_ids)
        # chunks hold whole lm-eval batches, so a single-request task (lambada) runs in exactly the
        # batches lm-eval's own `hf` model makes (bf16 logits depend on a batch's padded shape)
        order, chunks = _batching_plan(lm, instances, doc_ids, ctx.settings.batch_size, benchmark.CHECKPOINT_ITEMS)

        def score_chunk(chunk: range, enc: Encoder | None) -> ItemScores:
            """One pass over the documents in `chunk`: lm-eval answers their requests in one call
            (which reports no progress of its own: the bar moves a chunk at a time)."""
            items = order[chunk.start:chunk.stop]
            docs = [doc_ids[k] for k in items]
            local = {d: k for k, d in enumerate(docs)}
            insts = [instances[r] for d in docs for r in rows_of[d]]
            obs = _RequestObserver([local[i.doc_id] for i in insts], len(docs), ctx.model.bos_id, lm.max_length,
                                   enc is not None and enc.has_latents, None if first is None else first[items])
            lm.encoder, lm.observer = enc, obs
            try:
                resps = lm.loglikelihood(insts, disable_tqdm=True)
            finally:
                lm.encoder, lm.observer = None, None
            return self._scores(task, insts, resps, docs, obs)

        back = sorted(range(len(order)), key=order.__getitem__)  # item k was processed at position back[k]
        passes = benchmark_passes(ctx, encoders)
        requests = [(i.doc_id, i.idx, i.args) for i in instances]  # what lm-eval will ask, in order
        stores = pass_stores(ctx, self.spec, self.config(ctx), requests, passes)
        scores = {label: self._aggregate(task, resumable_pass(ctx, label, len(doc_ids),
                                                              lambda chunk, _, enc=enc: score_chunk(chunk, enc),
                                                              f"{self.spec.name} {label}", chunks, stores[label]
                                                              ).take(back))
                  for label, enc in passes.items()}
        items = [{"item": k, "doc_id": d} for k, d in enumerate(doc_ids)]
        metric_names = {m.name for m in self.spec.metrics}
        return {e.spec.label: self._lift(compare(scores[e.spec.label], scores["clean"], scores["zero"], e, ctx.settings.seed,
                                                 items), metric_names)
                for e in encoders}

    def _first_tokens(self, lm, task, instances, doc_ids) -> Tensor | None:
        return None

    def _scores(self, task, instances, resps, doc_ids, obs: _RequestObserver) -> ItemScores:
        """Per-document lm-eval metrics of one chunk of a pass (`_aggregate` combines the chunks)."""
        obs.copy_aliases()
        by_doc: dict[int, list[int]] = {}
        for r, inst in enumerate(instances):
            by_doc.setdefault(inst.doc_id, []).append(r)
        per_metric: dict[str, list] = {}
        correct, logp = torch.zeros(len(doc_ids)), torch.zeros(len(doc_ids), dtype=torch.float64)
        for k, d in enumerate(doc_ids):
            rows = by_doc[d]
            doc = instances[rows[0]].doc
            # loglikelihood tasks use lm-eval's default 'take_first' filter: the response itself
            result = task.process_results(doc, [resps[r] for r in rows])
            for name, value in result.items():
                per_metric.setdefault(name, []).append(value)
            if "acc" not in result:
                raise SaebenchError(f"lm-eval task {self.lm_eval_task!r} reports no 'acc' metric")
            correct[k] = float(result["acc"])
            logp[k] = resps[rows[self._gold_index(task, doc, len(rows), d)]][0]
        return ItemScores(correct, logp, obs.ce_sum, obs.ce_count, obs.features(), per_item=per_metric,
                          at_hookpoint=obs.at_hookpoint)

    @staticmethod
    def _aggregate(task, scores: ItemScores) -> ItemScores:
        """lm-eval's own aggregation of its per-document metrics over the whole pass (besides acc)."""
        aggregation = task.aggregation()
        scores.aggregates = {name: float(aggregation[name](values)) for name, values in scores.per_item.items()
                             if name in aggregation and name != "acc"}
        return scores

    @staticmethod
    def _gold_index(task, doc, n_choices: int, doc_id: int = -1) -> int:
        """Which request holds the answer: the only one, or the gold choice of a multiple-choice doc.

        A gold answer that names no choice is an error, never silently choice 0.
        """
        if task.OUTPUT_TYPE != "multiple_choice":
            return 0
        gold = task.doc_to_target(doc)
        where = f"lm-eval task {getattr(getattr(task, 'config', None), 'task', '?')!r}, document {doc_id}"
        if isinstance(gold, str):
            choices = task.doc_to_choice(doc)
            if gold not in choices:
                raise SaebenchError(f"{where}: its answer {gold!r} is not one of its choices {choices}")
            gold = choices.index(gold)
        if isinstance(gold, list):
            gold = gold[0]
        if not 0 <= int(gold) < n_choices:
            raise SaebenchError(f"{where}: its answer index {int(gold)} is outside its {n_choices} choices; "
                                "check the task's doc_to_target or the data file")
        return int(gold)

    @staticmethod
    def _lift(result: TaskResult, metric_names: set[str]) -> TaskResult:
        """Keep lm-eval aggregates this task declares as metrics; move the rest to `extra`."""
        other = {k: result.metrics.pop(k) for k in list(result.metrics) if k not in metric_names}
        for k in other:
            result.stderr.pop(k, None)
            result.n.pop(k, None)
        if other:
            result.extra["lm_eval_metrics"] = other
        return result


class LambadaTask(LMEvalTask):
    """LAMBADA (OpenAI version) through lm-eval's `lambada_openai`: acc and perplexity of the last word."""

    spec = TaskSpec("lambada", 2, "acc", BENCHMARK_METRICS + (
        MetricSpec("perplexity", "lower", "lm-eval's perplexity of the last word, spliced"),
        MetricSpec("perplexity_clean", "none", "lm-eval's perplexity of the last word, clean"),
    ), BENCHMARK_SUMMARY + ("perplexity",), BENCHMARK_STDERR, "items")
    data_fields = ("text",)  # lambada_openai's templates read doc["text"]

    def __init__(self, data_file: str | None = None, include_path: str | None = None, items: int | str | None = None):
        """
        Args:
            data_file: local copy of lambada_test.jsonl (`{"text": ...}` per line), for offline use.
            items: first N passages when --limit is not given; None for all.
        """
        super().__init__("lambada_openai", include_path, data_file, items=items)


class LambadaFirstTokenTask(LambadaTask):
    """LAMBADA scored by the first token only: argmax over the vocabulary at the last prompt
    position must equal the first token of ' ' + last word; log p(answer) is that token's."""

    spec = TaskSpec("lambada_first_token", 2, "acc", BENCHMARK_METRICS, BENCHMARK_SUMMARY, BENCHMARK_STDERR, "items")
    protocol = "first_token"

    def _first_tokens(self, lm, task, instances, doc_ids) -> Tensor:
        targets = {i.doc_id: i.args[1] for i in instances}
        return torch.tensor([lm.tok_encode(targets[d], add_special_tokens=False)[0] for d in doc_ids])

    def _scores(self, task, instances, resps, doc_ids, obs: _RequestObserver) -> ItemScores:
        scores = super()._scores(task, instances, resps, doc_ids, obs)
        scores.correct, scores.logp = obs.first_correct.clone(), obs.first_logp.clone()
        return scores

    @staticmethod
    def _aggregate(task, scores: ItemScores) -> ItemScores:
        scores = LMEvalTask._aggregate(task, scores)
        acc = scores.per_item.get("acc", [])
        scores.aggregates["lm_eval_acc"] = sum(map(float, acc)) / len(acc) if acc else None
        return scores
