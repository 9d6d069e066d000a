"""Simulators: what answers "is latent l active on this token?" for an LLM-simulated encoder (llm_sim).

`LLMSimulator` asks an LLM, one prompt per (token, latent), and reads the answer's probability from
the log-probs of the answer digits; `TokenRuleSimulator` is the no-LLM baseline that matches a latent's
most frequent activating tokens.

Values are asked as a digit 0-9 and answered as a distribution over the ten digits, so that a task can
read both the most likely digit (the mode) and the mean, as EleutherAI's study of LLM-simulated
encoders compares both. Two value prompts (VALUE_PROMPTS): 'default' says 0 means "not active";
'active' is that study's: "We explicitly tell the model that the latent is active, but we show an
example where the value is 0, due to rounding down."
"""

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any

import torch

from saebench.capture import LatentSample
from saebench.explanations import Explanations

ACTIVE_SYSTEM = (
    "You simulate one feature of a language model from an explanation of it. You see a text whose last "
    "token is marked <<like this>>. Answer 1 if the feature is active on the marked token and 0 if it is "
    "not. Answer with one digit.")
VALUE_SYSTEM = (
    "You simulate one feature of a language model from an explanation of it. You see a text whose last "
    "token is marked <<like this>>. Rate how strongly the feature is active on the marked token, from 0 "
    "(not active) to 9 (as strongly as on its strongest examples). Answer with one digit.")
VALUE_ACTIVE_SYSTEM = (
    "You simulate one feature of a language model from an explanation of it. You see a text whose last "
    "token is marked <<like this>>. The feature is active on the marked token. Rate how strongly, from 0 to 9, "
    "where 9 is as strongly as on its strongest examples. Ratings are rounded down: for example, a token on "
    "which the feature is active at a twentieth of its strongest activation is rated 0. Answer with one digit.")
VALUE_PROMPTS = {"default": VALUE_SYSTEM, "active": VALUE_ACTIVE_SYSTEM}
"""Value prompts by name: 'default' ("0 (not active)"), 'active' (the latent is said to be active; 0 from
rounding down, after EleutherAI's study)."""
DIGITS = tuple("0123456789")


class Simulator(ABC):
    """Answers P(active) and a 0-9 value for (text window, token, latent) queries."""

    label: str

    @abstractmethod
    def p_active(self, queries: list[tuple[str, int, int]]) -> list[float | None]:
        """queries: (marked text window, token id, latent)."""

    @abstractmethod
    def value_probs(self, queries: list[tuple[str, int, int]], prompt: str = "default") -> list[list[float] | None]:
        """P(value = 0), ..., P(value = 9) per query (None: no answer); `prompt` names a VALUE_PROMPTS entry."""

    def report(self) -> dict[str, Any]:
        return {}


class LLMSimulator(Simulator):
    """Asks an LLM, one prompt per (token, latent); answers are the log-probs of the answer digits."""

    def __init__(self, llm, explanations: Explanations, show_score: str = ""):
        """`show_score`: a score of each explanation (e.g. 'fuzzing', from explanations.scores) said in every prompt,
        as EleutherAI's study does in its "with fuzzing / detection score" rows; '' says none."""
        self.llm, self.explanations, self.label, self.show_score = llm, explanations, llm.label, show_score
        self.stats = type(llm.stats)()
        self.last_error = ""

    def _prompts(self, system: str, queries, question: str):
        from saebench.llm import Chat

        return [Chat(system, f"Text: {text}\n\nFeature explanation: {self.explanations.texts[latent]}"
                             f"{self._score(latent)}\n\n{question}") for text, _, latent in queries]

    def _score(self, latent: int) -> str:
        if not self.show_score:
            return ""
        value = self.explanations.scores.get(latent, {}).get(self.show_score)
        return "" if value is None else (f"\nHow well this explanation predicts the feature ({self.show_score} "
                                         f"score, 0.5 is chance, 1 is perfect): {value:.2f}")

    def _ask(self, prompts, choices, desc) -> list[list[float] | None]:
        return self.counted(lambda: self.llm.choice_probs(prompts, choices, desc))

    def counted(self, call):
        """call(), an LLM call whose prompts, failures and errors count as this simulator's (the LLM may be
        shared; an explanation scorer asking through the same encoder is counted here too)."""
        before = self.llm.stats.to_dict()
        out = call()
        after = self.llm.stats.to_dict()
        for f in fields(self.stats):
            if f.name == "errors":
                for k, v in after["errors"].items():
                    self.stats.errors[k] = self.stats.errors.get(k, 0) + v - before["errors"].get(k, 0)
            elif f.name != "first_error":
                setattr(self.stats, f.name, getattr(self.stats, f.name) + after[f.name] - before[f.name])
        if after["failed"] + after["unparsed"] > before["failed"] + before["unparsed"]:
            self.last_error = self.llm.last_error  # the LLM may be shared: its latest error is this call's
            self.stats.first_error = self.stats.first_error or self.last_error
        return out

    def p_active(self, queries):
        probs = self._ask(self._prompts(ACTIVE_SYSTEM, queries, "Is the feature active on the marked token? "
                                        "Answer 1 or 0."), ("1", "0"), "simulating latents")
        return [None if p is None else p[0] for p in probs]

    def value_probs(self, queries, prompt="default"):
        return self._ask(self._prompts(VALUE_PROMPTS[prompt], queries, "How strongly is the feature active on the "
                                       "marked token (0-9)?"), DIGITS, "simulating values")

    def report(self):
        # answers that can fail, under the keys the runner checks against RunConfig.max_failed (FAILURE_KEYS)
        return {"llm": self.stats.to_dict(), "asked": self.stats.prompts, "failed": self.stats.failed,
                "unparsed": self.stats.unparsed, "first_error": self.stats.first_error, "last_error": self.last_error}


class TokenRuleSimulator(Simulator):
    """The no-LLM baseline: P(active | token) for the latent's listed tokens, measured on the training
    sample (share of the token's occurrences where the latent fires), else 0; value = the distribution of
    the latent's activation bins on that token in the sample (its mean is the mean bin), else 0. It reads
    no prompt: both value prompts get the same answer."""

    label = "rules"
    NOTHING = (0.0, (1.0,) + (0.0,) * 9)
    """The answer for a token the latent does not list: P(active) 0 and value 0 for certain."""

    def __init__(self, sample: LatentSample, explanations: Explanations):
        flat = sample.tokens.reshape(-1)
        occurrences = torch.bincount(flat, minlength=int(flat.max()) + 1)
        self.table: dict[int, dict[int, tuple[float, tuple[float, ...]]]] = {}
        top = sample.max_value()
        for latent, toks in (explanations.tokens or {}).items():
            rows, vals = sample.of(latent)
            on = flat[rows]
            entry = {}
            for t in toks:
                hit = on == t
                bins = (10 * vals[hit] / top[latent]).floor().clamp(0, 9).long()
                hist = torch.bincount(bins, minlength=10).double()
                dist = tuple((hist / hist.sum()).tolist()) if hit.any() else self.NOTHING[1]
                entry[t] = (float(hit.sum()) / float(occurrences[t]), dist)
            self.table[latent] = entry

    def p_active(self, queries):
        return [self.table.get(latent, {}).get(tok, self.NOTHING)[0] for _, tok, latent in queries]

    def value_probs(self, queries, prompt="default"):
        return [list(self.table.get(latent, {}).get(tok, self.NOTHING)[1]) for _, tok, latent in queries]
