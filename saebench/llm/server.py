"""Any OpenAI-compatible server as the LLM: vllm serve, llama.cpp's server, hosted APIs.

Requests go through the `openai` client (chat completions, ``max_tokens=1, logprobs=True,
top_logprobs=20`` for answer probabilities), at most `concurrency` at a time. Timeouts, connection
errors, 429 and 5xx are retried with exponential backoff; a prompt still unanswered after its
retries is None and counted, and the run goes on. The client's own retries are off so that every
retry is counted here.
"""

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from saebench.errors import SaebenchError
from saebench.llm.base import LLM, Chat, ResponseCache

TOP_LOGPROBS = 20
"""Alternatives asked for at the answer token (vllm's default --max-logprobs, OpenAI's maximum)."""


class ServerLLM(LLM):
    """A model behind an OpenAI-compatible HTTP API."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5,
                 cache: ResponseCache | None = None, progress: bool = True):
        """
        Args:
            url: base URL of the API, e.g. http://127.0.0.1:8000/v1.
            model: model name on the server; None: the first one the server lists.
            concurrency: requests in flight at once.
            timeout: seconds before a request counts as timed out (then retried).
            retries: further attempts of a request after a retryable failure.
            backoff: seconds before the first retry, doubled at each further one (capped at 30).
        """
        import openai

        super().__init__(cache, progress)
        self._openai = openai
        self.url, self.concurrency, self.retries, self.backoff = url.rstrip("/"), concurrency, retries, backoff
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
        self.model = model or self._first_model()
        self.label = f"{self.model} @ {self.url}"
        self.cache_id = f"openai:{self.url}:{self.model}"
        self._lock = threading.Lock()

    def _first_model(self) -> str:
        """The first model the server lists; one clear error when it cannot be reached."""
        try:
            models = self.client.models.list().data
        except self._openai.APIConnectionError as exc:
            raise SaebenchError(f"cannot reach the LLM server at {self.url} ({_reason(exc)}); start it, or fix "
                                "--llm-url (e.g. http://127.0.0.1:8000/v1)") from None
        except self._openai.APIError as exc:
            raise SaebenchError(f"the LLM server at {self.url} did not list its models ({_reason(exc)}); "
                                "name the model with llm=<name>") from None
        if not models:
            raise SaebenchError(f"the LLM server at {self.url} serves no model")
        return models[0].id

    def _retryable(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(exc, o.APIStatusError) and exc.status_code >= 500

    def _call(self, request: Callable[[], Any]) -> Any | None:
        """One request with retries; None (counted) when it never succeeds."""
        for attempt in range(self.retries + 1):
            with self._lock:
                self.stats.requests += 1
                self.stats.retries += attempt > 0
            try:
                return request()
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none is fatal
                if not isinstance(exc, self._openai.OpenAIError) or not self._retryable(exc) or attempt == self.retries:
                    with self._lock:
                        self.stats.failed += 1
                        self.stats.count_error(type(exc).__name__)
                    return None
                time.sleep(min(30.0, self.backoff * 2 ** attempt))
        return None

    def _map(self, fn: Callable[[Chat], Any], prompts: Sequence[Chat]) -> list[Any]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, prompts))

    def _choice_logprobs(self, prompts, choices):
        def ask(prompt: Chat) -> dict[str, float] | None:
            resp = self._call(lambda: self.client.chat.completions.create(
                model=self.model, messages=prompt.messages(), max_tokens=1, temperature=0.0,
                logprobs=True, top_logprobs=TOP_LOGPROBS))
            if resp is None:
                return None
            try:
                top = resp.choices[0].logprobs.content[0].top_logprobs
                return {t.token: float(t.logprob) for t in top}
            except (AttributeError, IndexError, TypeError, ValueError):
                return {}  # a malformed answer: counted as unparsed by choice_probs

        return self._map(ask, prompts)

    def _generate(self, prompts, max_tokens):
        def ask(prompt: Chat) -> str | None:
            resp = self._call(lambda: self.client.chat.completions.create(
                model=self.model, messages=prompt.messages(), max_tokens=max_tokens, temperature=0.0))
            try:
                return None if resp is None else (resp.choices[0].message.content or "").strip()
            except (AttributeError, IndexError, TypeError):
                with self._lock:
                    self.stats.unparsed += 1
                    self.stats.count_error("malformed answer")
                return None

        return self._map(ask, prompts)

    def close(self) -> None:
        self.client.close()


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(cause or exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
