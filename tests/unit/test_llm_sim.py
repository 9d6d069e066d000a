"""The LLM-simulated encoder: metric code against scikit-learn, the LLM backends and their fault handling,
explanation files, and llm_sim end to end on a tiny model."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from saebench.errors import SaebenchError
from saebench.explanations import load_jsonl
from saebench.llm import LLM, Chat, ResponseCache, normalise_choices
from saebench.llm.server import ServerLLM
from saebench.runner import RunConfig, evaluate
from saebench.tasks.simulation import classification, matched_cosine
from tests.unit.llm_server import FakeOpenAIServer
from tests.unit.test_cli_errors import assert_clean_failure, run_cli


@pytest.mark.parametrize("case", ["perfect", "random", "inverted"])
def test_classification_scores_match_scikit_learn(case):
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.2
    p = {"perfect": y.astype(float), "random": rng.random(300), "inverted": 1.0 - y}[case]
    pred = p >= 0.5
    got = classification(y, pred, p, d_latent=1000)
    assert got["recall"] == pytest.approx(recall_score(y, pred))
    assert got["specificity"] == pytest.approx(recall_score(~y, ~pred))
    assert got["precision"] == pytest.approx(precision_score(y, pred, zero_division=0)) or got["precision"] is None
    assert got["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["auc"] == pytest.approx(roc_auc_score(y, p))
    expected = {"perfect": (1.0, 1.0, 1.0), "inverted": (0.0, 0.0, 0.0)}.get(case)
    if expected:
        assert (got["recall"], got["specificity"], got["auc"]) == pytest.approx(expected)
    # scaled to the full dictionary: |A| recall + (d - |A|)(1 - specificity)
    assert got["expected_active"] == pytest.approx(y.sum() * got["recall"] + (1000 - y.sum()) * (1 - got["specificity"]))


def test_classification_without_positives_or_predictions_gives_none_not_zero():
    y = np.zeros(5, dtype=bool)
    got = classification(y, np.zeros(5, dtype=bool), np.zeros(5), 10)
    assert got["recall"] is None and got["auc"] is None and got["precision"] is None and got["specificity"] == 1.0


def test_matched_cosine_is_the_best_one_to_one_matching():
    W = torch.eye(4)
    assert matched_cosine(W, torch.tensor([0, 1]), torch.tensor([1, 0])) == pytest.approx(1.0)
    assert matched_cosine(W, torch.tensor([0]), torch.tensor([2, 3])) == pytest.approx(0.0)
    assert matched_cosine(W, torch.tensor([0, 1, 2, 3]), torch.tensor([1])) == pytest.approx(0.25)  # 3 unmatched
    assert matched_cosine(W, torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0.0
    assert matched_cosine(W, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) is None
    V = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    # 0->2 (0.8) + 1->1 (1.0) beats 0->1 (0.6) + 1->2 (0.96)
    assert matched_cosine(V, torch.tensor([0, 1]), torch.tensor([1, 2])) == pytest.approx((0.8 + 1.0) / 2)


def test_answer_probabilities_come_from_log_probs_renormalised_over_the_choices():
    assert normalise_choices({"1": math.log(0.6), " 0": math.log(0.2), "x": 0.0}, ("1", "0")) == pytest.approx([0.75, 0.25])
    assert normalise_choices({"1": math.log(0.5)}, ("1", "0")) == pytest.approx([1.0, 0.0])
    assert normalise_choices({"x": 0.0}, ("1", "0")) is None


class CountingLLM(LLM):
    """Answers '1' with probability 0.8 for every prompt; counts what reaches the backend."""

    cache_id, label = "counting", "counting"

    def __init__(self, cache):
        super().__init__(cache, progress=False)
        self.asked = 0

    def _choice_logprobs(self, prompts, choices):
        self.asked += len(prompts)
        return [{"1": math.log(0.8), "0": math.log(0.2)} for _ in prompts]

    def _generate(self, prompts, max_tokens):
        self.asked += len(prompts)
        return [f"answer to {p.user}" for p in prompts]


def test_the_response_cache_makes_a_rerun_free(tmp_path):
    prompts = [Chat("s", f"u{i}") for i in range(600)]  # more than one block
    first = CountingLLM(ResponseCache(tmp_path / "r.sqlite"))
    a = first.choice_probs(prompts, ("1", "0"))
    assert first.asked == 600 and a[0] == pytest.approx([0.8, 0.2]) and 0 <= first.stats.seconds < 60
    again = CountingLLM(ResponseCache(tmp_path / "r.sqlite"))  # a new process would see the same file
    assert again.choice_probs(prompts, ("1", "0")) == a and again.asked == 0 and again.stats.cached == 600
    assert again.choice_probs(prompts, ("1", "0", "2")) != a and again.asked == 600  # other params: other key
    assert again.generate(prompts[:2], 5) == ["answer to u0", "answer to u1"]


def test_an_interrupted_generation_keeps_its_finished_blocks(tmp_path):
    """Generated answers are stored every GENERATE_BLOCK prompts: a run stopped in its third block asks only
    what was not stored when it is run again."""
    from saebench.llm.base import GENERATE_BLOCK

    prompts = [Chat("s", f"u{i}") for i in range(3 * GENERATE_BLOCK)]

    class Interrupted(CountingLLM):
        def _generate(self, prompts, max_tokens):
            if self.asked >= 2 * GENERATE_BLOCK:
                raise KeyboardInterrupt
            return super()._generate(prompts, max_tokens)

    with pytest.raises(KeyboardInterrupt):
        Interrupted(ResponseCache(tmp_path / "r.sqlite")).generate(prompts, 5)
    again = CountingLLM(ResponseCache(tmp_path / "r.sqlite"))
    assert again.generate(prompts, 5) == [f"answer to u{i}" for i in range(len(prompts))]
    assert again.asked == GENERATE_BLOCK and again.stats.cached == 2 * GENERATE_BLOCK


def test_server_backend_reads_log_probs_and_counts_every_fault(tmp_path):
    with FakeOpenAIServer(slow_seconds=1.5) as server:
        llm = ServerLLM(server.url, concurrency=1, timeout=0.5, retries=2, backoff=0.01,
                        cache=ResponseCache(None), progress=False)
        assert llm.served_model == "fake-sim"
        on, off = Chat("s", "Feature explanation: ALWAYS"), Chat("s", "Feature explanation: x")
        assert llm.choice_probs([on, off], ("1", "0")) == [pytest.approx([0.9, 0.1]), pytest.approx([0.1, 0.9])]
        server.faults = ["500", "500"]  # two 5xx, then an answer: retried
        assert llm.choice_probs([on], ("1", "0")) == [pytest.approx([0.9, 0.1])] and llm.stats.retries == 2
        server.faults = ["malformed"]  # a body that is not JSON: an answer, unreadable (unparsed, not retried)
        assert llm.choice_probs([on], ("1", "0")) == [None] and llm.stats.unparsed == 1 and llm.stats.failed == 0
        assert llm.stats.first_error.startswith("malformed answer (JSONDecodeError")
        server.faults = ["no_logprobs"]  # an answer without log-probs: unparsed, not 0
        assert llm.choice_probs([on], ("1", "0")) == [None] and llm.stats.unparsed == 2
        server.faults = ["slow"] * 3  # slower than the timeout every time
        assert llm.choice_probs([on], ("1", "0")) == [None] and llm.stats.failed == 1
        assert llm.stats.errors == {"malformed answer": 1, "no log-probs in the answer": 1, "APITimeoutError": 1}
        server.stop()  # the server goes away mid-run: retried, then counted
        assert llm.choice_probs([Chat("s", "new")], ("1", "0")) == [None] and llm.stats.failed == 2


def test_an_unreachable_server_is_one_clear_error():
    with pytest.raises(SaebenchError, match=r"cannot reach the LLM server at http://127.0.0.1:9/v1 .*--llm-url"):
        ServerLLM("http://127.0.0.1:9/v1", timeout=1, retries=0)


def test_the_in_process_backend_reads_the_answer_tokens_next_token_probabilities(tmp_path, tiny_tokenizer,
                                                                                 monkeypatch):
    from saebench.llm.local import TransformersLLM
    from tests.conftest import save_tiny_chat_model

    tok = tiny_tokenizer  # shared by the session: the chat template is undone after this test
    path = tmp_path / "chat-llama"
    model = save_tiny_chat_model(path, tok, monkeypatch)
    llm = TransformersLLM(str(path), dtype="float32", cache=ResponseCache(None), progress=False)
    prompts = [Chat("sys", "a short one"), Chat("sys", "a much longer prompt than the first one is")]
    got = llm.choice_probs(prompts, ("1", "0"))
    ids = [tok.encode(c, add_special_tokens=False)[0] for c in "10"]
    for prompt, probs in zip(prompts, got):
        text = tok.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
        with torch.no_grad():
            logits = model.model(torch.tensor([tok.encode(text, add_special_tokens=False)])).logits[0, -1]
        expected = torch.softmax(logits[ids], 0)  # padding in the batch changes nothing
        assert probs == pytest.approx(expected.tolist(), abs=1e-4)


def test_explanation_files_are_checked_line_by_line(tmp_path):
    path = tmp_path / "e.jsonl"
    for text, message in [('{"latent": 0, "explanation": "a"}\n{oops\n', "line 2 is not JSON"),
                          ('{"latent": 70, "explanation": "a"}\n', "latent 70 is outside the encoder's 64 latents"),
                          ('{"latent": 1, "explanation": "a"}\n{"latent": 1, "explanation": "b"}\n', "explained twice"),
                          ('{"latent": "1", "explanation": "a"}\n', 'needs an integer "latent"')]:
        path.write_text(text)
        with pytest.raises(SaebenchError, match=message):
            load_jsonl(path, 64)
    path.write_text('{"latent": 3, "explanation": " words ", "scores": {"detection": 0.7}}\n\n')
    got = load_jsonl(path, 64)
    assert got.texts == {3: "words"} and got.source.startswith("file:e.jsonl#") and got.missing(5) == [0, 1, 2, 4]




def _explanations(tmp_path, always: set[int], d: int = 64, skip: tuple[int, ...] = ()):
    path = tmp_path / "expl.jsonl"
    path.write_text("".join(json.dumps({"latent": i, "explanation": "ALWAYS" if i in always else "never"}) + "\n"
                            for i in range(d) if i not in skip))
    return path


def test_bad_explanations_and_server_are_one_line_and_write_nothing(tiny_llama_dir, tiny_sae_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    sae = f"sae:{tiny_sae_dir}"
    base = ["run", "--model", str(tiny_llama_dir), "--task", "latent_recall", "--limit", "4", "--context-len", "32"]
    missing = _explanations(tmp_path, set(), skip=(5, 9))
    code, err = run_cli([*base, "--encoder", f"llm_sim:{sae}?explanations={missing}"], capsys, out)
    assert_clean_failure(code, err, out, "lack 2 of the 64 latents (5, 9); add them, or pass missing=skip")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"latent": 64, "explanation": "x"}\n')
    code, err = run_cli([*base, "--encoder", f"llm_sim:{sae}?explanations={bad}"], capsys, out)
    assert_clean_failure(code, err, out, "latent 64 is outside the encoder's 64 latents")
    code, err = run_cli([*base, "--encoder", f"llm_sim:{sae}?explanations={missing}&missing=skip",
                         "--llm-url", "http://127.0.0.1:9/v1"], capsys, out)
    assert_clean_failure(code, err, out, "cannot reach the LLM server at http://127.0.0.1:9/v1")
    code, err = run_cli([*base, "--encoder", "llm_sim:identity?llm=rules"], capsys, out)
    assert_clean_failure(code, err, out, "llm_sim simulates latents; 'identity' has none")
    code, err = run_cli([*base, "--encoder", sae], capsys, out)
    assert_clean_failure(code, err, out, "latent_recall scores encoders that predict latents from text")


def test_llm_sim_through_a_server_end_to_end(tiny_llama, tiny_sae_dir, tmp_path):
    always = set(range(0, 64, 2))
    expl = _explanations(tmp_path, always)
    with FakeOpenAIServer() as server:
        config = RunConfig(output_dir=tmp_path / "runs", limit=6, context_len=32, progress=False,
                           encoder_options={"llm_sim": {"llm_url": server.url}})
        spec = f"llm_sim:sae:{tiny_sae_dir}?explanations={expl}&candidates=10"
        recall, values, ce = evaluate(tiny_llama, [spec], ["latent_recall", "value_correlation", "ce_kl"], config)
    details = [json.loads(line) for line in next((tmp_path / "runs" / "latent_recall").glob("*.details.jsonl"))
               .read_text().splitlines()]
    prompts = [d for d in details if "prompt" in d]
    assert len(prompts) == 6
    for d in prompts:  # known answer: every even candidate is predicted, no odd one
        assert set(d["predicted"]) <= always and set(d["active"]) & always <= set(d["predicted"])
        assert d["recall"] == pytest.approx(len(set(d["active"]) & always) / len(d["active"]))
    # the server answers P(active) 0.9 for even latents and 0.1 for odd: recall is the even share of the active
    assert recall.metrics["recall"] is not None and recall.extra["simulator"] == "fake-sim @ " + server.url
    assert recall.metrics["n_failed"] == 0 and recall.extra["explanations"].startswith("file:expl.jsonl#")
    assert {d["x"] for d in details if d.get("curve") == "threshold"} >= {0.0, 0.5, 1.0}
    report = recall.extra["encoder_report"]
    assert report["candidates"] > 0 and report["llm"]["failed"] == 0
    # every truly active latent got a value; the fake server says 6.8 for even latents, 1.8 for odd ones
    assert values.metrics["mean_value"] is not None and values.metrics["n_failed"] == 0
    assert ce.metrics["kl"] is not None and ce.extra["encoder_report"]["rows"] > 0


def test_the_token_baseline_runs_without_an_llm(tiny_llama, tiny_sae_dir, tmp_path):
    config = RunConfig(output_dir=tmp_path / "runs", limit=5, context_len=32, progress=False)
    (rec,) = evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?llm=rules"], ["latent_recall"], config)
    assert rec.encoder["params"]["simulator"] == "rules" and rec.encoder["params"]["explanations"] == "tokens"
    assert 0.0 <= rec.metrics["specificity"] <= 1.0 and rec.metrics["n_failed"] == 0


def test_delphi_explanations_are_read_as_delphi_writes_them(tmp_path):
    from saebench.explanations import load_delphi

    folder = tmp_path / "run" / "explanations"
    folder.mkdir(parents=True)
    for module, latent, text in [("layers.15", 0, "numbers"), ("layers.15", 7, "the word the"), ("layers.3", 1, "x")]:
        (folder / f"{module}_latent{latent}.txt").write_bytes(json.dumps(text).encode())
    with pytest.raises(SaebenchError, match=r"several modules \(layers.15, layers.3\); pick one"):
        load_delphi(tmp_path / "run", 64)
    got = load_delphi(tmp_path / "run", 64, "layers.15")
    assert got.texts == {0: "numbers", 7: "the word the"} and got.source == "delphi:run/layers.15"
    with pytest.raises(SaebenchError, match="latent 7 is outside the encoder's 5 latents"):
        load_delphi(folder, 5, "layers.15")
    (folder / "layers.3_latent2.txt").write_text("not json")
    with pytest.raises(SaebenchError, match="layers.3_latent2.txt.* is not JSON"):
        load_delphi(folder, 64, "layers.3")


def test_missing_skip_leaves_unexplained_latents_out_and_counts_them(tiny_llama, tiny_sae_dir, tmp_path):
    skip = tuple(range(0, 64, 3))
    expl = _explanations(tmp_path, set(range(64)), skip=skip)
    with FakeOpenAIServer() as server:
        config = RunConfig(output_dir=tmp_path / "runs", limit=6, context_len=32, progress=False,
                           encoder_options={"llm_sim": {"llm_url": server.url}})
        (rec,) = evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?explanations={expl}&missing=skip&candidates=all"],
                          ["latent_recall"], config)
    rows = [json.loads(line) for line in next((tmp_path / "runs" / "latent_recall").glob("*.details.jsonl"))
            .read_text().splitlines() if '"prompt"' in line]
    assert rec.encoder["params"]["unexplained"] == len(skip)
    assert all(not set(r["predicted"]) & set(skip) for r in rows)  # every explained latent is predicted active
    assert all(not set(r["active"]) & set(skip) and r["true_l0"] == len(r["active"]) + r["skipped_active"] == 4 for r in rows)
    assert rec.extra["skipped_active"] == sum(r["skipped_active"] for r in rows) > 0
    assert all(r["recall"] == 1.0 for r in rows if r["active"])


@pytest.mark.parametrize("values", ["oracle", "oracle_fp", "predicted"])
def test_predicted_codes_are_valued_as_the_values_option_says(values):
    from saebench.encoders.base import EncoderSpec, dense
    from saebench.encoders.llm_sim import LLMSimEncoder, Simulation
    from saebench.encoders.llm_sim_options import LLMSimConfig
    from saebench.capture import LatentSample

    # latent 0 fires 2.0 and 4.0 in the sample, latent 1 fires 1.0, 3.0 and 5.0 (median 3.0)
    sample = LatentSample(torch.zeros(1, 8, dtype=torch.long), torch.tensor([1, 2, 3, 4, 5]),
                          torch.tensor([4.0, 2.0, 5.0, 3.0, 1.0]), torch.tensor([0, 2, 5, 5]))
    enc = LLMSimEncoder.__new__(LLMSimEncoder)
    enc.cfg, enc.sample, enc.spec = LLMSimConfig(values=values), sample, EncoderSpec("llm_sim", None, None, 4, 3)
    enc.median = torch.tensor([sample.value_at(i, 0.5) for i in range(3)])
    # candidates 0 (truly active, 2.5), 1 (a false positive), 2 (predicted inactive)
    sim = Simulation([torch.tensor([0, 1, 2])], [torch.tensor([2.5, 0.0, 0.0])], [torch.tensor([0.9, 0.8, 0.1])],
                     [torch.tensor([float("nan"), 9.0, float("nan")])], 3, [0])
    got = dense(enc.codes_of(sim))[0].tolist()
    expected = {"oracle": [2.5, 0.0, 0.0], "oracle_fp": [2.5, 3.0, 0.0],
                "predicted": [0.0, 5.0, 0.0]}[values]  # an unanswered value is missing: the latent is left out
    assert got == pytest.approx(expected)


def test_the_progress_bar_moves_within_a_block(monkeypatch):
    """A backend that reports each answered batch moves the bar as it goes; the bar ends at the prompt count."""
    import saebench.llm.base as base

    seen = []

    class Bar:
        def __init__(self, *a, **kw):
            self.n = 0

        def update(self, n):
            self.n += n
            seen.append(self.n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Batched(CountingLLM):
        def _generate(self, prompts, max_tokens):
            for start in range(0, len(prompts), 4):
                self._answered(min(4, len(prompts) - start))
            return super()._generate(prompts, max_tokens)

    monkeypatch.setattr(base, "tqdm", Bar)
    Batched(ResponseCache(None)).generate([Chat("s", f"u{i}") for i in range(10)], 5)
    assert seen[:3] == [4, 8, 10] and seen[-1] == 10
