"""Simulators: what answers "is latent l active on this token?" for an LLM-simulated encoder (llm_sim).

`LLMSimulator` asks an LLM, one prompt per (token, latent), and reads the answer's probability from
the log-probs of the answer digits; `TokenRuleSimulator` is the no-LLM baseline that matches a latent's
most frequent activating tokens.
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
DIGITS = tuple("0123456789")


class Simulator(ABC):
    """Answers P(active) and a 0-9 value for (text window, token, latent) queries."""

    label: str

    @abstractmethod
    def p_active(self, queries: list[tuple[str, int, int]]) -> list[float | None]:
        """queries: (marked text window, token id, latent)."""

    @abstractmethod
    def value(self, queries: list[tuple[str, int, int]]) -> list[float | None]:
        """Expected 0-9 activation value per query."""

    def report(self) -> dict[str, Any]:
        return {}


class LLMSimulator(Simulator):
    """Asks an LLM, one prompt per (token, latent); answers are the log-probs of the answer digits."""

    def __init__(self, llm, explanations: Explanations):
        self.llm, self.explanations, self.label = llm, explanations, llm.label
        self.stats = type(llm.stats)()
        self.last_error = ""

    def _prompts(self, system: str, queries, question: str):
        from saebench.llm import Chat

        return [Chat(system, f"Text: {text}\n\nFeature explanation: {self.explanations.texts[latent]}\n\n{question}")
                for text, _, latent in queries]

    def _ask(self, prompts, choices, desc) -> list[list[float] | None]:
        before = self.llm.stats.to_dict()
        out = self.llm.choice_probs(prompts, choices, desc)
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

    def value(self, queries):
        probs = self._ask(self._prompts(VALUE_SYSTEM, queries, "How strongly is the feature active on the marked "
                                        "token (0-9)?"), DIGITS, "simulating values")
        return [None if p is None else sum(i * q for i, q in enumerate(p)) for p in probs]

    def report(self):
        # answers that can fail, under the keys the runner checks against RunConfig.max_failed (FAILURE_KEYS)
        return {"llm": self.stats.to_dict(), "asked": self.stats.prompts, "failed": self.stats.failed,
                "unparsed": self.stats.unparsed, "first_error": self.stats.first_error, "last_error": self.last_error}


class TokenRuleSimulator(Simulator):
    """The no-LLM baseline: P(active | token) for the latent's listed tokens, measured on the training
    sample (share of the token's occurrences where the latent fires), else 0; value = the latent's mean
    activation bin on that token in the sample."""

    label = "rules"

    def __init__(self, sample: LatentSample, explanations: Explanations):
        flat = sample.tokens.reshape(-1)
        occurrences = torch.bincount(flat, minlength=int(flat.max()) + 1)
        self.table: dict[int, dict[int, tuple[float, float]]] = {}
        top = sample.max_value()
        for latent, toks in (explanations.tokens or {}).items():
            rows, vals = sample.of(latent)
            on = flat[rows]
            entry = {}
            for t in toks:
                hit = on == t
                bins = (10 * vals[hit] / top[latent]).floor().clamp(0, 9)
                entry[t] = (float(hit.sum()) / float(occurrences[t]), float(bins.mean()))
            self.table[latent] = entry

    def p_active(self, queries):
        return [self.table.get(latent, {}).get(tok, (0.0, 0.0))[0] for _, tok, latent in queries]

    def value(self, queries):
        return [self.table.get(latent, {}).get(tok, (0.0, 0.0))[1] for _, tok, latent in queries]
