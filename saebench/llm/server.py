"""Any OpenAI-compatible server as the LLM: vllm serve, llama.cpp's server, hosted APIs.

Requests go through the `openai` client (chat completions, ``max_tokens=1, logprobs=True,
top_logprobs=20`` for answer probabilities), at most `concurrency` at a time. Timeouts, connection
errors, 429 and 5xx are retried with exponential backoff; a prompt still unanswered after its
retries is None and counted as failed, and an answer whose body cannot be read is counted as
unparsed; the run goes on (the runner refuses a record with too many of either: RunConfig.max_failed).
Any other error status (400, 404, ...) is one SaebenchError naming the server's answer: it would
fail every prompt alike. The client's own retries are off so that every retry is counted here.
"""

import json

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
        self.served_model = model or self._first_model()
        """The model name the server answers under. With the URL, it is all a client can know of the weights: a
        server that swaps weights under the same name is not detected by the response cache, so clear the cache
        (saebench's cache folder, llm/responses.sqlite) or serve the new weights under another name."""
        self.label = f"{self.served_model} @ {self.url}"
        self.cache_id = f"openai:{self.url}:{self.served_model}"  # URL + served name (format kept: caches stay valid)
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
        """One request with retries.

        Returns:
            The response; None, counted as failed, when every attempt timed out, lost its connection or got
            429 or 5xx; None, counted as unparsed, when the answer's body could not be read.
        Raises:
            SaebenchError: the server refused the request otherwise (400, 404, ...), with its status and message.
            Anything else (a bug) as it is.
        """
        o = self._openai
        for attempt in range(self.retries + 1):
            with self._lock:
                self.stats.requests += 1
                self.stats.retries += attempt > 0
            try:
                return request()
            except (json.JSONDecodeError, o.APIResponseValidationError) as exc:  # the server answered, unreadably
                with self._lock:
                    self.count_failure("unparsed", "malformed answer", f"malformed answer ({type(exc).__name__}: "
                                                                      f"{str(exc)[:200]})")
                return None
            except o.APIError as exc:
                if not self._retryable(exc):
                    raise SaebenchError(f"the LLM server at {self.url} refused a request for model "
                                        f"{self.served_model!r}: {_answer(exc)}; nothing was scored (check the "
                                        "model name and that the server returns log-probs)") from None
                if attempt == self.retries:
                    with self._lock:
                        self.count_failure("failed", type(exc).__name__, _answer(exc))
                    return None
            time.sleep(min(30.0, self.backoff * 2 ** attempt))
        return None

    def _map(self, fn: Callable[[Chat], Any], prompts: Sequence[Chat]) -> list[Any]:
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            return list(pool.map(fn, prompts))
        finally:  # after an error, the prompts not yet sent are not sent
            pool.shutdown(wait=True, cancel_futures=True)

    def _choice_logprobs(self, prompts, choices):
        def ask(prompt: Chat) -> dict[str, float] | None:
            resp = self._call(lambda: self.client.chat.completions.create(
                model=self.served_model, messages=prompt.messages(), max_tokens=1, temperature=0.0,
                logprobs=True, top_logprobs=TOP_LOGPROBS))
            if resp is None:
                return None
            try:
                top = resp.choices[0].logprobs.content[0].top_logprobs
                return {t.token: float(t.logprob) for t in top}
            except (AttributeError, IndexError, TypeError, ValueError):
                # counted, and not cached: a server set up to return log-probs is asked again on a rerun
                with self._lock:
                    self.count_failure("unparsed", "no log-probs in the answer", "the answer carried no log-probs")
                return None

        return self._map(ask, prompts)

    def _generate(self, prompts, max_tokens):
        def ask(prompt: Chat) -> str | None:
            resp = self._call(lambda: self.client.chat.completions.create(
                model=self.served_model, messages=prompt.messages(), max_tokens=max_tokens, temperature=0.0))
            try:
                return None if resp is None else (resp.choices[0].message.content or "").strip()
            except (AttributeError, IndexError, TypeError):
                with self._lock:
                    self.count_failure("unparsed", "malformed answer", "malformed answer (no message content)")
                return None

        return self._map(ask, prompts)

    def close(self) -> None:
        self.client.close()


def _answer(exc: Exception) -> str:
    """What the server answered, in one line: 'HTTP 400: <its message>', or why there was no answer."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {exc.status_code}: {' '.join(str(message or exc.message).split())[:300]}"
    return f"{type(exc).__name__}: {_reason(exc)}"


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(cause or exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
