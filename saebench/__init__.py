"""saebench: what does a language model lose when its activations are replaced by an encoder's reconstruction?"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saebench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from saebench.errors import SaebenchError  # noqa: E402
from saebench.runner import RunConfig, evaluate  # noqa: E402

__all__ = ["RunConfig", "SaebenchError", "__version__", "evaluate"]
