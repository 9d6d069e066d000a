"""Children's Book Test (CN / NE) with the GPT-2 paper's language-model protocol.

lm-eval dropped CBT in 2023, so saebench scores it itself. Protocol (Radford et al. 2019,
section 3.2, after Hill et al. 2015): put each of the 10 candidates into the blanked 21st
sentence, score the log-likelihood of that whole sentence given the 20 context sentences,
and answer with the most likely candidate. The shared context runs once per pass; its key/value
cache is then repeated for the 10 candidate sentences, which run as one batch. An encoder
spliced into the candidate pass sees positions counted from the start of the sentence.
"""

import re
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saebench.encoders.base import Encoder
from saebench.errors import SaebenchError
from saebench.splice import Splice
from saebench.tasks.base import Task, TaskContext, TaskResult, TaskSpec
from saebench.tasks.benchmark import (BENCHMARK_METRICS, BENCHMARK_STDERR, BENCHMARK_SUMMARY, ItemScores,
                                      benchmark_passes, checked_items, compare, item_limit, pass_stores,
                                      resumable_pass)
from saebench.tasks.prompt_recorder import PromptRecorder
from saebench.tasks.lm_eval_data import file_sha256

BLANK = "XXXXX"
SUBSETS = ("cn", "ne")


@dataclass(frozen=True)
class CBTQuestion:
    """One CBT question: 20 context sentences, a query with XXXXX, the answer and 10 candidates."""

    context: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class CBTConfig:
    """Effective parameters of a CBT run (hashed into records)."""

    subset: str
    """'cn' (common nouns) or 'ne' (named entities)."""
    data_file: str | None
    """CBTest question file (cbtest_CN_test_2500ex.txt format); None for the HF dataset `cbt`."""
    data_sha256: str | None
    items: int | None
    """First N questions (--limit, else the preset's items); None for all."""
    protocol: str = "gpt2_full_sentence"


def parse_cbt(text: str, source: str = "CBT file") -> list[CBTQuestion]:
    """Parse the CBTest format: lines 'N sentence' (N = 1..20), then '21 query\\tanswer\\t\\tc1|...|c10'."""
    questions = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        try:
            context = tuple(line.split(" ", 1)[1] if " " in line else "" for line in lines[:-1])
            number, rest = lines[-1].split(" ", 1)
            query, answer, _, candidates = rest.split("\t")
        except ValueError:
            raise SaebenchError(f"{source}: question {len(questions) + 1} is not in CBTest format "
                                "('21 query<TAB>answer<TAB><TAB>c1|...|c10' after 20 numbered lines)") from None
        cands = tuple(candidates.strip().split("|"))
        if BLANK not in query or answer not in cands:
            raise SaebenchError(f"{source}: question {len(questions) + 1} has no {BLANK} or its answer is not a candidate")
        questions.append(CBTQuestion(context, query, answer, cands))
    if not questions:
        raise SaebenchError(f"{source}: no questions found")
    return questions


def detokenize(text: str) -> str:
    """Undo the CoreNLP tokenisation of CBT text (the GPT-2 paper scored de-tokenised text)."""
    text = text.replace("``", '"').replace("''", '"').replace("`", "'").replace("-LRB-", "(").replace("-RRB-", ")")
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'m|'d)\b", r"\1", text)


def load_questions(subset: str, data_file: str | None) -> list[CBTQuestion]:
    """Questions from a CBTest file, else from the HF dataset `cbt` (needs the hub)."""
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise SaebenchError(f"--data-file {data_file!r} does not exist")
        return parse_cbt(path.read_text(encoding="utf-8"), str(path))
    try:
        from datasets import load_dataset

        rows = load_dataset("cbt", subset.upper(), split="test")
    except Exception as exc:  # offline, or the hub refused: say what to do instead
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]  # one line, the message kept
        raise SaebenchError(f"could not load the HF dataset cbt/{subset.upper()} ({reason}); "
                            f"pass --data-file with a CBTest file (cbtest_{subset.upper()}_test_2500ex.txt)") from exc
    return [CBTQuestion(tuple(r["sentences"]), r["question"], r["answer"], tuple(r["options"])) for r in rows]


class CBTTask(Task):
    """CBT-CN / CBT-NE accuracy, clean, zero-ablated and spliced (GPT-2 protocol)."""

    # v2: details rows hold each item's MSE / L0 / ||x|| at the hookpoint and its correctness class
    spec = TaskSpec("cbt", 2, "acc", BENCHMARK_METRICS, BENCHMARK_SUMMARY, BENCHMARK_STDERR, "items")

    def __init__(self, subset: str = "cn", data_file: str | None = None, items: int | str | None = None):
        """
        Args:
            subset: 'cn' or 'ne'.
            data_file: CBTest question file, for offline use.
            items: first N questions when --limit is not given (a preset's protocol); None for all.
        """
        if subset.lower() not in SUBSETS:
            raise SaebenchError(f"cbt subset must be one of {', '.join(SUBSETS)}, not {subset!r}")
        self.subset, self.data_file, self.items = subset.lower(), data_file, checked_items("cbt", items)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return asdict(CBTConfig(self.subset, self.data_file, file_sha256(self.data_file), item_limit(ctx, self.items)))

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        questions = load_questions(self.subset, self.data_file)[:item_limit(ctx, self.items)]
        tokenized = [self._tokenize(ctx, q) for q in questions]
        passes = benchmark_passes(ctx, encoders)
        stores = pass_stores(ctx, self.spec, self.config(ctx), tokenized, passes)
        scores = {label: resumable_pass(ctx, label, len(questions),
                                        partial(self._score_items, ctx, enc, questions, tokenized),
                                        f"cbt_{self.subset} {label}", store=stores[label])
                  for label, enc in passes.items()}
        items = [{"item": k, "answer": q.answer} for k, q in enumerate(questions)]
        return {e.spec.label: compare(scores[e.spec.label], scores["clean"], scores["zero"], e, ctx.settings.seed, items)
                for e in encoders}

    def _score_items(self, ctx: TaskContext, enc: Encoder | None, questions: list[CBTQuestion],
                     tokenized: list[tuple[list[int], list[list[int]]]], chunk: range, tick) -> ItemScores:
        """One pass over the questions in `chunk` (items numbered from the chunk's start)."""
        recorder = PromptRecorder(len(chunk), ctx.model.bos_id, enc is not None and enc.has_latents)
        correct, logp = torch.zeros(len(chunk)), torch.zeros(len(chunk), dtype=torch.float64)
        for k, i in enumerate(chunk):
            ll = self._score(ctx, enc, recorder, k, *tokenized[i])
            gold = questions[i].candidates.index(questions[i].answer)
            correct[k], logp[k] = float(int(ll.argmax()) == gold), ll[gold].item()
            tick(1)
        return ItemScores(correct, logp, recorder.ce_sum, recorder.ce_count, recorder.features(),
                          at_hookpoint=recorder.at_hookpoint)

    @staticmethod
    def _tokenize(ctx: TaskContext, q: CBTQuestion) -> tuple[list[int], list[list[int]]]:
        """Context ids (left-truncated to fit) and one id list per candidate sentence."""
        tok = ctx.model.tokenizer
        context = detokenize(" ".join(q.context))
        conts = [tok.encode(" " + detokenize(q.query.replace(BLANK, c)), add_special_tokens=False)
                 for c in q.candidates]
        ctx_ids = tok.encode(context)
        limit = ctx.model.max_positions
        if limit is not None:
            ctx_ids = ctx_ids[-(limit - max(map(len, conts))):]
        return ctx_ids, conts

    @torch.no_grad()
    def _score(self, ctx: TaskContext, enc: Encoder | None, recorder: PromptRecorder, item: int,
               ctx_ids: list[int], cont_ids: list[list[int]]) -> Tensor:
        """(n_candidates,) log-likelihood of each candidate sentence given the context."""
        ids = torch.tensor([ctx_ids])
        recorder.set_rows([(item, len(ctx_ids))], len(ctx_ids))
        out = self._forward(ctx, enc, ids, ctx.keep_mask(ids), recorder.on_chunk, use_cache=True)
        recorder.record_logits(ids, out.logits)
        first = torch.log_softmax(out.logits[0, -1].float(), -1).cpu()
        n, width = len(cont_ids), max(map(len, cont_ids))
        conts = torch.zeros(n, width, dtype=torch.long)  # right-padded: padding sits after every scored token
        for c, seq in enumerate(cont_ids):
            conts[c, :len(seq)] = torch.tensor(seq)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        keep = conts == ctx.model.bos_id if not ctx.settings.splice.splice_bos else torch.zeros_like(conts, dtype=torch.bool)
        logp = torch.log_softmax(self._forward(ctx, enc, conts, keep, None, past_key_values=cache).logits.float(), -1)
        logp = logp.cpu()
        scores = torch.empty(n, dtype=torch.float64)
        for c, seq in enumerate(cont_ids):
            rest = logp[c, :len(seq) - 1].gather(-1, conts[c, 1:len(seq), None]).sum()
            scores[c] = (first[seq[0]] + rest).item()
        return scores

    @staticmethod
    def _forward(ctx: TaskContext, enc: Encoder | None, ids: Tensor, keep: Tensor, on_chunk, **kwargs):
        model = ctx.model.model
        if enc is None:
            return model(ids.to(ctx.model.device), **kwargs)
        splice = Splice(ctx.hook.hookpoint, enc, ctx.settings.splice, on_chunk)
        splice.set_batch(ids, keep)
        with splice.installed():
            return model(ids.to(ctx.model.device), **kwargs)
