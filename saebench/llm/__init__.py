"""LLMs that simulate encoders and write explanations: one interface (LLM), three backends.

- ``transformers``: in this process; any chat model by preset, hub id or path (default: the embedded
  SmolLM2-135M-Instruct).
- ``server``: any OpenAI-compatible server (``--llm-url``): vllm serve, llama.cpp's server, hosted APIs.
- ``vllm``: vllm's offline engine in this process (GPU machines with vllm installed).
"""

from dataclasses import dataclass

from saebench.errors import SaebenchError
from saebench.llm.base import LLM, Chat, LLMStats, ResponseCache, normalise_choices

BACKENDS = ("auto", "transformers", "server", "vllm")

__all__ = ["BACKENDS", "LLM", "Chat", "LLMSettings", "LLMStats", "ResponseCache", "make_llm", "normalise_choices"]


@dataclass(frozen=True)
class LLMSettings:
    """Which LLM answers, and how requests to a server behave."""

    model: str = ""
    """Model: a preset, hub id or path (transformers, default the embedded smollm2-135m; vllm); or the served
    model's name (server; default the first it lists)."""
    backend: str = "auto"
    """'auto' (server when `url` is set, else transformers), 'transformers', 'server' or 'vllm'."""
    url: str = ""
    """Base URL of an OpenAI-compatible server (http://host:port/v1)."""
    concurrency: int = 8
    """Server requests in flight at once."""
    timeout: float = 60.0
    """Seconds before a server request times out (then it is retried)."""
    retries: int = 4
    """Further attempts of a server request after a timeout, connection error, 429 or 5xx."""

    def resolved_backend(self) -> str:
        if self.backend not in BACKENDS:
            raise SaebenchError(f"unknown LLM backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "auto":
            return "server" if self.url else "transformers"
        if self.backend == "server" and not self.url:
            raise SaebenchError("backend=server needs the server's URL: --llm-url http://host:port/v1")
        return self.backend


_OPEN: dict[tuple, LLM] = {}


def make_llm(settings: LLMSettings, progress: bool = True) -> LLM:
    """The LLM `settings` describe, answering through saebench's on-disk response cache; one instance per
    process and settings (a simulator and an explainer on the same model share it)."""
    from saebench.models import cache_dir

    backend = settings.resolved_backend()
    key = (backend, settings)
    if key not in _OPEN:
        cache = ResponseCache(cache_dir() / "llm" / "responses.sqlite")
        if backend == "server":
            from saebench.llm.server import ServerLLM

            llm: LLM = ServerLLM(settings.url, settings.model or None, None, settings.concurrency, settings.timeout,
                                 settings.retries, cache=cache, progress=progress)
        elif backend == "vllm":
            from saebench.llm.local import VLLMOfflineLLM

            if not settings.model:
                raise SaebenchError("backend=vllm needs the model to load: llm=<hub id or path>")
            llm = VLLMOfflineLLM(settings.model, cache=cache, progress=progress)
        else:
            from saebench.llm.local import TransformersLLM

            llm = TransformersLLM(settings.model or "smollm2-135m", cache=cache, progress=progress)
        _OPEN[key] = llm
    return _OPEN[key]
