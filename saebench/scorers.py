"""Explanation scorers (001 in the sources, Paulo et al.; their protocols as EleutherAI's delphi implements
them): how well an explanation lets a scorer tell a latent's activating examples from non-activating ones.

- ``detection``: the scorer reads examples (activating ones from every quantile, and random non-activating
  ones, shuffled) and says which show the latent.
- ``fuzzing``: every example has tokens marked <<like this>>: an activating example its truly activating
  tokens (those at >= 0.3 of its largest activation), a non-activating one as many random tokens as an
  activating example has active ones on average (rounded up); the scorer says which are marked correctly.
- ``surprisal``: a language model reads each example after the explanation and after a generic description;
  a good explanation lowers the loss of activating examples more than of non-activating ones (scored by AUC of
  the loss difference).
- ``embedding``: examples are retrieved with the explanation as the query of a sentence-embedding model
  (AUC of the cosine similarity).

Judges answer detection and fuzzing: an LLM through saebench.llm (its cache, retries and counted failures),
asked `shown` examples per prompt (001: five; delphi's scorer default: one), or a rule that matches a
latent's token list (the no-LLM baseline, and the known-answer tests). With one example per prompt the LLM's
answer is the probability of "1" against "0", so an AUC exists; with several it writes a list of 0/1 and only
the predictions are kept (as delphi does without log-probs). The prompts are saebench's own wording of the
protocol's (a system instruction, three worked examples, the explanation and the numbered examples).
"""

import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from saebench.errors import SaebenchError
from saebench.latent_examples import Example

SCORERS = ("detection", "fuzzing", "surprisal", "embedding", "intervention")
"""intervention is run by the task (it steers the subject model: saebench.tasks.intervention)."""
CLASSIFIERS = ("detection", "fuzzing")


@dataclass
class Item:
    """One example put to a scorer for one latent."""

    latent: int
    example: Example
    label: bool
    """The right answer: activating (detection, surprisal, embedding) or marked correctly (fuzzing)."""
    marks: frozenset[int] | None = None
    """Fuzzing: the positions marked <<...>>."""
    prediction: bool | None = None
    probability: float | None = None
    """P(label is True) where the judge gives one; surprisal: the loss drop; embedding: the similarity."""
    extra: dict[str, Any] | None = None

    def text(self) -> str:
        return self.example.highlighted(set(self.marks)) if self.marks is not None else self.example.text()


def detection_items(latent: int, test: list[Example], negatives: list[Example]) -> list[Item]:
    return [Item(latent, e, e.activating) for e in test + negatives]


def fuzzing_items(latent: int, test: list[Example], negatives: list[Example], seed: int) -> list[Item]:
    """Activating examples marked at their truly active tokens; non-activating ones at n random tokens, n the
    rounded-up mean count of active tokens in the activating examples (delphi's n_incorrect)."""
    n_wrong = math.ceil(sum(sum(a > 0 for a in e.activations) for e in test) / max(len(test), 1))
    items = []
    for e in test:
        top = max(e.activations)
        items.append(Item(latent, e, True, frozenset(i for i, a in enumerate(e.activations) if a >= 0.3 * top)))
    for e in negatives:
        rng = random.Random(seed * 7919 + latent * 31 + e.window)
        marks = frozenset(rng.sample(range(len(e.tokens)), min(n_wrong, len(e.tokens))))
        items.append(Item(latent, e, False, marks))
    return items


def shuffled_groups(items: list[Item], shown: int, seed: int) -> list[list[Item]]:
    """The items in a seeded random order, `shown` per prompt."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i:i + shown] for i in range(0, len(order), shown)]


class Judge(ABC):
    """Answers detection and fuzzing prompts."""

    label: str

    @abstractmethod
    def judge(self, kind: str, explanations: dict[int, str], groups: list[list[Item]]) -> None:
        """Set each item's prediction (and probability where there is one); None where no answer was read."""

    def report(self) -> dict[str, Any]:
        return {}


SYSTEM = {
    "detection": (
        "You are a careful linguist studying one feature of a language model. You get an explanation of what the "
        "feature responds to, then numbered text examples. Some examples contain text the feature responds to, "
        "others do not; each example is judged on its own. For each example, answer 1 if the feature would "
        "respond to something in it, else 0."),
    "fuzzing": (
        "You are a careful linguist studying one feature of a language model. You get an explanation of what the "
        "feature responds to, then numbered text examples in which some tokens are marked <<like this>>. Some "
        "marks are right, some are wrong. For each example, answer 1 if every marked token is one the feature "
        "responds to, as the explanation says, else 0."),
}
ANSWER = {1: " Answer 1 or 0.", 0: " Answer with a list of 1s and 0s, one per example, like [1,0,1]."}
SHOTS = {
    "detection": [
        ("years written as four digits", ["The bridge opened in 1932 after years of delay.",
                                         "She poured the tea and sat down by the window.",
                                         "Sales fell sharply between 2008 and 2009.",
                                         "He left the keys on the kitchen table.",
                                         "The castle, built around 1250, still stands."], [1, 0, 1, 0, 1]),
        ("the word 'however' starting a clause", ["The plan was sound; however, nobody funded it.",
                                                 "He walked to the station in the rain.",
                                                 "Prices rose again this spring.",
                                                 "The team trained hard all week.",
                                                 "Most agreed. However, two members objected."], [1, 0, 0, 0, 1]),
    ],
    "fuzzing": [
        ("years written as four digits", ["The bridge opened in <<1932>> after years of delay.",
                                         "She poured <<the>> tea and sat down by the window.",
                                         "Sales fell sharply between <<2008>> and <<2009>>.",
                                         "He left the <<keys>> on the kitchen table.",
                                         "The castle, built around <<1250>>, still stands."], [1, 0, 1, 0, 1]),
        ("the word 'however' starting a clause", ["The plan was sound; <<however>>, nobody funded it.",
                                                 "He <<walked>> to the station in the rain.",
                                                 "Prices <<rose>> again this spring.",
                                                 "The team trained <<hard>> all week.",
                                                 "Most agreed. <<However>>, two members objected."], [1, 0, 0, 0, 1]),
    ],
}
"""saebench's worked examples; a prompt of k examples shows them k at a time (cycled), so the answer list the
judge sees has the length it must write."""


def _user(explanation: str, texts: list[str]) -> str:
    body = "\n".join(f"Example {i + 1}: {t}" for i, t in enumerate(texts))
    return f"Feature explanation: {explanation}\n\nExamples:\n{body}"


def _answer(labels: list[int]) -> str:
    return str(labels[0]) if len(labels) == 1 else "[" + ",".join(map(str, labels)) + "]"


def classifier_prompt(kind: str, explanation: str, texts: list[str]):
    """The chat prompt asking for `texts` (one answer digit when there is one text, else a list)."""
    from saebench.llm import Chat

    one, k = len(texts) == 1, len(texts)
    shots = []
    for expl, examples, labels in SHOTS[kind]:
        if one:  # the worked examples one at a time, as the question will be asked
            shots += [(_user(expl, [t]), _answer([y])) for t, y in list(zip(examples, labels))[:3]]
        else:
            pick = [i % len(examples) for i in range(k)]
            shots.append((_user(expl, [examples[i] for i in pick]), _answer([labels[i] for i in pick])))
    return Chat(SYSTEM[kind] + ANSWER[int(one)], _user(explanation, texts), tuple(shots))


LIST = re.compile(r"\[([01\s,]*)\]")


def parse_list(text: str | None, n: int) -> list[int] | None:
    """The first bracketed list of n 0/1 answers in `text`; None if there is none."""
    if text is None:
        return None
    match = LIST.search(text)
    if match is None:
        return None
    digits = [int(d) for d in re.findall(r"[01]", match.group(1))]
    return digits if len(digits) == n else None


class LLMJudge(Judge):
    """An LLM reads `shown` examples per prompt (saebench.llm: cached, retried, failures counted)."""

    def __init__(self, llm, shown: int, counted=None):
        """`counted(call)` runs an LLM call and counts its answers where the caller keeps them (default: as is)."""
        self.llm, self.shown, self.label = llm, shown, llm.label
        self.counted = counted or (lambda call: call())

    def judge(self, kind, explanations, groups):
        prompts = [classifier_prompt(kind, explanations[g[0].latent], [it.text() for it in g]) for g in groups]
        if self.shown == 1:
            answers = self.counted(lambda: self.llm.choice_probs(prompts, ("1", "0"), desc=f"{kind} scoring"))
            for group, probs in zip(groups, answers):
                if probs is not None:
                    group[0].probability = probs[0]
                    group[0].prediction = probs[0] >= 0.5
            return
        def ask() -> None:
            answers = self.llm.generate(prompts, max_tokens=3 * self.shown + 4, desc=f"{kind} scoring")
            for group, text in zip(groups, answers):
                labels = parse_list(text, len(group))
                if labels is None:
                    if text is not None:
                        self.llm.count_failure("unparsed", "no list of 0/1 answers",
                                               f"no list of {len(group)} 0/1 answers in {text[:80]!r}")
                    continue
                for it, y in zip(group, labels):
                    it.prediction = bool(y)

        self.counted(ask)


class RuleJudge(Judge):
    """No LLM: an explanation that lists tokens (explanations=tokens) says 1 when an example has one of them
    (detection) or when every marked token is one of them (fuzzing). `inverted` answers the opposite (a
    scorer that must score 0: the known-answer tests)."""

    def __init__(self, tokens: dict[int, list[int]], inverted: bool = False):
        self.tokens, self.inverted = tokens, inverted
        self.label = "rules" + (" (inverted)" if inverted else "")

    def judge(self, kind, explanations, groups):
        for group in groups:
            for it in group:
                listed = set(self.tokens.get(it.latent, ()))
                if kind == "detection":
                    yes = any(t in listed for t in it.example.tokens)
                else:
                    yes = bool(it.marks) and all(it.example.tokens[i] in listed for i in it.marks)
                yes = yes != self.inverted
                it.prediction, it.probability = yes, float(yes)


SURPRISAL_INTRO = ("Below is a description of a feature of text, followed by text excerpts in which the feature "
                   "appears.\n")
GENERIC = "Various unrelated text."
"""The description surprisal compares an explanation with (001: 'a generic explanation')."""


def surprisal_prefix(explanation: str) -> str:
    return f"{SURPRISAL_INTRO}Description: {explanation}\nExcerpts:\n"


def score_surprisal(llm, explanations: dict[int, str], items: list[Item]) -> None:
    """Each item's probability is the drop in mean per-token loss (nats) when the text follows the latent's
    explanation instead of the generic description; a failed answer leaves it None."""
    by_latent: dict[int, list[Item]] = {}
    for it in items:
        by_latent.setdefault(it.latent, []).append(it)
    texts = sorted({it.example.text() for it in items})
    generic = dict(zip(texts, llm.text_logprobs(surprisal_prefix(GENERIC), texts, desc="surprisal")))
    for latent, group in by_latent.items():
        given = llm.text_logprobs(surprisal_prefix(explanations[latent]), [it.example.text() for it in group],
                                  desc="surprisal")
        for it, lp in zip(group, given):
            base = generic.get(it.example.text())
            if lp and base:
                drop = sum(lp) / len(lp) - sum(base) / len(base)
                it.probability, it.prediction = drop, drop > 0
                it.extra = {"no_explanation": [-x for x in base], "explanation": [-x for x in lp]}


EMBED_QUERY = "Instruct: Find text excerpts that match this description of a feature\nQuery: {}"


class Embedder:
    """A sentence-embedding model (sentence-transformers) by hub name or local path."""

    def __init__(self, name: str, device: str | None = None):
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(name, device=device or "cpu")
        except Exception as exc:  # any failure to load is the user's model name or files: one line
            raise SaebenchError(f"embedding model {name!r} could not be loaded ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); give a sentence-transformers "
                                "model name or a local folder (embedding_model=...)") from None
        self.name = name

    def score(self, explanations: dict[int, str], items: list[Item]) -> None:
        """Each item's probability is the cosine similarity of its text to the latent's explanation as a query."""
        texts = sorted({it.example.text() for it in items})
        emb = dict(zip(texts, self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)))
        latents = sorted({it.latent for it in items})
        queries = self.model.encode([EMBED_QUERY.format(explanations[l]) for l in latents], convert_to_tensor=True,
                                    normalize_embeddings=True)
        q = dict(zip(latents, queries))
        for it in items:
            it.probability = float((q[it.latent] * emb[it.example.text()]).sum())


def classification_metrics(items: list[Item]) -> dict[str, float | None]:
    """accuracy, balanced_accuracy, f1 (of the True class) over the items with a prediction, auc over those with
    a probability (None where a class is missing), and n_failed (items without a prediction or probability)."""
    from sklearn.metrics import roc_auc_score

    answered = [it for it in items if it.prediction is not None]
    pos = [it for it in answered if it.label]
    neg = [it for it in answered if not it.label]
    tp = sum(it.prediction for it in pos)
    fp = sum(it.prediction for it in neg)
    tn = len(neg) - fp
    out: dict[str, float | None] = {
        "accuracy": (tp + tn) / len(answered) if answered else None,
        "balanced_accuracy": (tp / len(pos) + tn / len(neg)) / 2 if pos and neg else None,
        "f1": 2 * tp / (2 * tp + fp + len(pos) - tp) if tp else (0.0 if pos else None),
    }
    scored = [it for it in items if it.probability is not None and math.isfinite(it.probability)]
    labels = {it.label for it in scored}
    out["auc"] = float(roc_auc_score([it.label for it in scored], [it.probability for it in scored])) \
        if len(labels) == 2 else None
    out["n_failed"] = float(sum(it.prediction is None and it.probability is None for it in items))
    return out


def decile_accuracy(items: list[Item]) -> dict[int, float]:
    """Accuracy of the answered items by decile: 0 the non-activating examples, 1 (weakest) to 10 (strongest)."""
    by: dict[int, list[bool]] = {}
    for it in items:
        if it.prediction is not None:
            by.setdefault(it.example.decile, []).append(it.prediction == it.label)
    return {d: sum(v) / len(v) for d, v in sorted(by.items())}
