"""No LLM failure stays silent: a refused request or a bug is one error, failed and unparsed answers are counted,
never scored, and a task with too many of them writes no record."""

import json
import uuid

import httpx
import openai
import pytest

from saebench import RunConfig, evaluate
from saebench.errors import SaebenchError
from saebench.llm.base import Chat, ResponseCache
from saebench.llm.server import ServerLLM
from tests.unit.llm_server import FakeOpenAIServer
from tests.unit.test_cli_errors import assert_clean_failure, run_cli


def _mock_openai(monkeypatch, status: int, message: str) -> str:
    """Route the openai client to an in-process server that lists one model and answers every chat request with
    `status`; returns a base URL unique to the test (make_llm keeps one LLM per URL)."""
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "mock", "object": "model",
                                                                         "created": 0, "owned_by": "test"}]})
        return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error"}})

    real = openai.OpenAI
    monkeypatch.setattr(openai, "OpenAI", lambda **kw: real(**kw, http_client=httpx.Client(
        transport=httpx.MockTransport(answer))))
    return f"http://mock-{uuid.uuid4().hex[:8]}/v1"


@pytest.mark.parametrize("status, message", [(400, "logprobs are not supported"), (404, "model 'x' not found")])
def test_a_refused_request_is_one_error_naming_the_servers_answer(monkeypatch, status, message):
    url = _mock_openai(monkeypatch, status, message)
    llm = ServerLLM(url, retries=3, backoff=0.01, cache=ResponseCache(None), progress=False)
    with pytest.raises(SaebenchError, match=rf"refused a request for model 'mock': HTTP {status}: {message}"):
        llm.choice_probs([Chat("s", f"u{i}") for i in range(20)], ("1", "0"))
    assert llm.stats.failed == 0 and llm.stats.retries == 0  # neither retried nor counted


def test_a_bug_is_raised_not_counted():
    with FakeOpenAIServer() as server:
        llm = ServerLLM(server.url, cache=ResponseCache(None), progress=False)
        llm.client.chat.completions.create = lambda **kw: 1 / 0
        with pytest.raises(ZeroDivisionError):
            llm.choice_probs([Chat("s", "u")], ("1", "0"))
        assert llm.stats.failed == 0 and llm.stats.errors == {}


def test_server_errors_after_retries_are_counted_with_the_servers_answer():
    with FakeOpenAIServer() as server:
        llm = ServerLLM(server.url, concurrency=1, retries=1, backoff=0.01, cache=ResponseCache(None), progress=False)
        server.faults = ["500", "500"]
        assert llm.choice_probs([Chat("s", "u")], ("1", "0")) == [None]
        assert llm.stats.failed == 1 and llm.stats.first_error == "HTTP 500: boom"


def _sim_setup(tmp_path, tiny_sae_dir):
    expl = tmp_path / "expl.jsonl"
    # one explanation per latent, so that no two candidates share a prompt (and its answer)
    text = {i: ("ALWAYS" if i % 2 == 0 else "never") + f" ({i})" for i in range(64)}
    expl.write_text("".join(json.dumps({"latent": i, "explanation": t}) + "\n" for i, t in text.items()))
    return f"llm_sim:sae:{tiny_sae_dir}?explanations={expl}&candidates=10&concurrency=1"


def test_a_refused_request_stops_the_run_with_one_line(monkeypatch, tiny_llama_dir, tiny_sae_dir, tmp_path, capsys):
    url = _mock_openai(monkeypatch, 400, "this server does not return logprobs")
    out = tmp_path / "runs"
    code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--hookpoint", "layers.1.resid_pre", "--task",
                         "latent_recall", "--limit", "4", "--context-len", "32", "--llm-url", url,
                         "--encoder", _sim_setup(tmp_path, tiny_sae_dir)], capsys, out)
    assert_clean_failure(code, err, out, "HTTP 400: this server does not return logprobs")


def test_too_many_failed_answers_write_no_record(tiny_llama_dir, tiny_sae_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    with FakeOpenAIServer() as server:
        server.faults = ["no_logprobs"] * 10_000
        code, err = run_cli(["run", "--model", str(tiny_llama_dir), "--hookpoint", "layers.1.resid_pre", "--task",
                             "latent_recall", "--limit", "4", "--context-len", "32", "--llm-url", server.url,
                             "--encoder", _sim_setup(tmp_path, tiny_sae_dir)], capsys, out)
    assert_clean_failure(code, err, out, "latent_recall: 0 failed and 56 unparsed of the 56 answers of encoder")
    assert "(100.0%, more than --max-failed 2.0%): no record written; first error: the answer carried no log-probs" \
        in err
    assert not list(out.rglob("*.pt"))  # no checkpoint of the failed answers is left to resume from


def test_failed_answers_below_the_limit_are_in_the_record_and_the_leaderboard(tiny_llama, tiny_sae_dir, tmp_path):
    from saebench.leaderboard import write_leaderboards

    spec = _sim_setup(tmp_path, tiny_sae_dir)
    with FakeOpenAIServer() as server:
        server.faults = ["no_logprobs"] * 5  # unparsed, and not cached
        config = RunConfig(output_dir=tmp_path / "runs", limit=4, context_len=32, progress=False, max_failed=0.5,
                           encoder_options={"llm_sim": {"llm_url": server.url}})
        (rec,) = evaluate(tiny_llama, [spec], ["latent_recall"], config)
        assert rec.extra["failed_answers"] == {"asked": 56, "failed": 0, "unparsed": 5,
                                               "first_error": "the answer carried no log-probs"}
        assert rec.metrics["n_failed"] == 5 and rec.extra["encoder_report"]["unparsed"] == 5
        (lb,) = [p for p in write_leaderboards(tmp_path / "runs", tmp_path / "lb") if p.name == "latent_recall.md"]
        header, _, row = [line for line in lb.read_text().splitlines() if line.startswith("|")][:3]
        assert "| failed answers " in header and "| 5 of 56 " in row
        # a record written under a looser limit is not reused under a tighter one: computed again, and the
        # unparsed answers were not cached, so they are asked again (the server answers them now)
        (again,) = evaluate(tiny_llama, [spec], ["latent_recall"], RunConfig(**{**vars(config), "max_failed": 0.02}))
        assert again.extra["failed_answers"] == {"asked": 56, "failed": 0, "unparsed": 0, "first_error": None}


def test_failed_value_answers_are_left_out_and_counted(tiny_llama, tiny_sae_dir, tmp_path, monkeypatch):
    from saebench.simulators import LLMSimulator

    real = LLMSimulator.value_probs

    def every_third_fails(self, queries, prompt="default"):
        return [None if i % 3 == 0 else v for i, v in enumerate(real(self, queries, prompt))]

    monkeypatch.setattr(LLMSimulator, "value_probs", every_third_fails)
    with FakeOpenAIServer() as server:
        config = RunConfig(output_dir=tmp_path / "runs", limit=4, context_len=32, progress=False,
                           encoder_options={"llm_sim": {"llm_url": server.url}})
        (rec,) = evaluate(tiny_llama, [_sim_setup(tmp_path, tiny_sae_dir)], ["value_correlation"], config)
    failed = rec.extra["encoder_report"]["failed_values"]
    assert failed > 0 and rec.metrics["n_failed"] == failed
    assert rec.n["pearson_bin"] == rec.n["n_failed"] - failed  # the missing values are not in the correlation


def test_the_cache_key_of_a_local_model_follows_its_weights(tmp_path, tiny_tokenizer):
    from saebench.llm.local import weights_identity
    from tests.conftest import make_tiny

    folder = tmp_path / "model"
    ids = []
    for seed in (0, 1, 1):  # retrained in place, then saved again unchanged
        make_tiny("llama", tiny_tokenizer, seed=seed).model.save_pretrained(folder)
        ids.append(weights_identity(str(folder)))
    assert ids[0] != ids[1] == ids[2] and ids[0].startswith(f"{folder}@sha256:")
    # hub and embedded models keep the key they had (their revision names the weights): caches stay valid
    assert weights_identity("org/some-model", "0123abc") == "org/some-model@0123abc"


def test_a_servers_cache_key_is_its_url_and_served_model_name():
    with FakeOpenAIServer() as server:
        llm = ServerLLM(server.url, cache=ResponseCache(None), progress=False)
        assert llm.served_model == "fake-sim" and llm.cache_id == f"openai:{server.url}:fake-sim"


def test_an_empty_answer_cached_by_an_earlier_saebench_is_asked_again(tmp_path):
    """saebench before 2026-12 cached a server's answer without log-probs as {}; a rerun against a fixed server
    must ask again, not count the stale entry as unparsed for ever."""
    with FakeOpenAIServer() as server:
        cache = ResponseCache(tmp_path / "responses.sqlite")
        llm = ServerLLM(server.url, cache=cache, progress=False)
        prompt = Chat("s", "u")
        stale = ResponseCache.key(llm.cache_id, "choices", {"choices": ["1", "0"]}, *prompt.key_parts())
        cache.put_many({stale: {}})
        probs = llm.choice_probs([prompt], ("1", "0"))
        assert probs[0] is not None and llm.stats.cached == 0 and llm.stats.unparsed == 0
