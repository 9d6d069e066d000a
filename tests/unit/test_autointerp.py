"""Explanation scoring (saebench.scorers, saebench.latent_examples, task autointerp): known answers that fail
when sampling, splitting, judging or the metrics go wrong."""

import math
import re

import pytest
import torch

from saebench.capture import LatentSample
from saebench.errors import SaebenchError
from saebench.latent_examples import Example, LatentWindows, draw
from saebench.scorers import (
    Item,
    RuleJudge,
    classification_metrics,
    classifier_prompt,
    decile_accuracy,
    detection_items,
    fuzzing_items,
    parse_list,
    shuffled_groups,
)

D, VOCAB, LENGTH = 6, 40, 64


class Pieces:
    def decode(self, ids):
        return f" t{ids[0]}"


def token_sample(seed: int = 0, n_ctx: int = 400) -> LatentSample:
    """Latent l fires on every occurrence of token 10 + l (value drawn from 1..5), nowhere else."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n_ctx, LENGTH), generator=g)
    flat = tokens.reshape(-1)
    rows, values, offsets = [], [], [0]
    for latent in range(D):
        r = (flat == 10 + latent).nonzero().squeeze(1)
        v = 1 + 4 * torch.rand(len(r), generator=g)
        order = torch.argsort(v, descending=True)
        rows.append(r[order])
        values.append(v[order])
        offsets.append(offsets[-1] + len(r))
    return LatentSample(tokens, torch.cat(rows), torch.cat(values), torch.tensor(offsets))


def scored(judge, explanations, kind="detection", seed=0):
    """Per-latent metrics of `judge` on the token sample."""
    windows = LatentWindows(token_sample(seed), Pieces())
    out = {}
    for latent in range(D):
        test = draw(windows.quantiles(latent), 50, "quantiles", latent)
        negatives = windows.non_activating(latent, 50, seed)
        items = detection_items(latent, test, negatives) if kind == "detection" else \
            fuzzing_items(latent, test, negatives, seed)
        judge.judge(kind, explanations, shuffled_groups(items, 5, latent))
        out[latent] = (classification_metrics(items), items)
    return out


@pytest.mark.parametrize("kind", ["detection", "fuzzing"])
def test_a_scorer_that_knows_the_activations_scores_1_shuffled_half_inverted_0(kind):
    right = {l: [10 + l] for l in range(D)}
    texts = {l: "x" for l in range(D)}
    for latent, (m, items) in scored(RuleJudge(right), texts, kind).items():
        assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["f1"] == 1.0 and m["auc"] == 1.0
        assert sum(it.label for it in items) == 50 and len(items) == 100  # 5 per quantile + 50 negatives
    shuffled = {l: [10 + (l + 1) % D] for l in range(D)}
    balanced = [m["balanced_accuracy"] for m, _ in scored(RuleJudge(shuffled), texts, kind).values()]
    assert 0.4 <= sum(balanced) / D <= 0.6
    for m, _ in scored(RuleJudge(right, inverted=True), texts, kind).values():
        assert m["accuracy"] == 0.0 and m["balanced_accuracy"] == 0.0 and m["auc"] == 0.0


def test_quantiles_windows_and_non_activating_examples_by_hand():
    sample = token_sample()
    windows = LatentWindows(sample, Pieces())
    ids, acts = windows.activations(0)
    assert windows.n_activating(0) == len(ids) and (acts.max(1).values[:-1] >= acts.max(1).values[1:]).all()
    for w, a in zip(ids.tolist(), acts):  # the window's activations sit exactly on token 10
        assert ((windows.windows[w] == 10) == (a > 0)).all()
    quantiles = windows.quantiles(0)
    size = len(ids) // 10
    assert [len(q) for q in quantiles] == [size] * 10
    assert min(max(e.activations) for e in quantiles[0]) >= max(max(e.activations) for e in quantiles[1])
    assert [e.decile for e in quantiles[0][:1] + quantiles[9][:1]] == [10, 1]
    picked = draw(quantiles, 50, "quantiles", 3)
    assert [sum(e.quantile == q for e in picked) for q in range(10)] == [5] * 10
    assert [e.window for e in draw(quantiles, 7, "top", 0)] == ids[:7].tolist()
    negatives = windows.non_activating(0, 50, 0)
    assert len(negatives) == 50 and len({e.window for e in negatives}) == 50
    assert all(10 not in e.tokens and e.quantile == -1 and e.decile == 0 for e in negatives)
    assert windows.non_activating(0, windows.n_windows, 0) == []  # not enough silent windows: none


def test_metrics_and_deciles_by_hand():
    def item(label, prediction, probability, quantile):
        return Item(0, Example(0, [1], [1.0 if quantile >= 0 else 0.0], quantile), label, None, prediction, probability)

    items = [item(True, True, 0.9, 0), item(True, False, 0.4, 9), item(True, True, 0.8, 9),
             item(False, False, 0.1, -1), item(False, True, 0.6, -1), item(False, None, None, -1)]
    m = classification_metrics(items)
    # answered: TP 2, FN 1, TN 1, FP 1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and m["n_failed"] == 1
    assert m["auc"] == pytest.approx(5 / 6)  # of 6 (positive, negative) pairs, 0.4 < 0.6 is the one wrong
    assert decile_accuracy(items) == {0: 0.5, 1: 0.5, 10: 1.0}
    one_class = classification_metrics([item(True, True, 0.9, 0)])
    assert one_class["balanced_accuracy"] is None and one_class["auc"] is None


def test_fuzzing_marks_active_tokens_and_as_many_random_ones():
    windows = LatentWindows(token_sample(), Pieces())
    test = draw(windows.quantiles(2), 50, "quantiles", 0)
    items = fuzzing_items(2, test, windows.non_activating(2, 50, 0), 0)
    n_wrong = math.ceil(sum(sum(a > 0 for a in e.activations) for e in test) / len(test))
    for it in items:
        if it.label:
            assert {it.example.tokens[i] for i in it.marks} == {12}
        else:
            assert len(it.marks) == n_wrong and "<<" in it.text()


def test_prompts_and_answer_parsing():
    one = classifier_prompt("detection", "years", ["In 1999 it rained."])
    assert one.user.endswith("Example 1: In 1999 it rained.") and "Answer 1 or 0" in one.system
    assert all(a in ("0", "1") for _, a in one.shots)
    five = classifier_prompt("fuzzing", "years", ["a <<b>>"] * 5)
    assert "list of 1s and 0s" in five.system and all(a.startswith("[") for _, a in five.shots)
    assert five.messages()[1]["role"] == "user" and five.messages()[2]["role"] == "assistant"
    assert parse_list("Sure: [1, 0,1,1,0] done", 5) == [1, 0, 1, 1, 0]
    assert parse_list("[1,0]", 5) is None and parse_list("no list", 2) is None and parse_list(None, 1) is None


def test_text_logprobs_reuse_the_prefix_and_match_one_pass(tmp_path, tiny_tokenizer, monkeypatch):
    from saebench.llm import ResponseCache
    from saebench.llm.local import TransformersLLM
    from tests.conftest import save_tiny_chat_model

    model = save_tiny_chat_model(tmp_path / "chat-llama", tiny_tokenizer, monkeypatch)
    llm = TransformersLLM(str(tmp_path / "chat-llama"), dtype="float32", cache=ResponseCache(tmp_path / "c.sqlite"),
                          progress=False)
    prefix, texts = "a description of text:", [" the cat sat", " on the mat and then some more", ""]
    got = llm.text_logprobs(prefix, texts)
    assert got[2] == []
    pre = tiny_tokenizer.encode(prefix, add_special_tokens=False)
    for text, lp in zip(texts[:2], got):
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model.model(torch.tensor([pre + ids])).logits[0], -1)
        assert lp == pytest.approx([float(logp[len(pre) - 1 + j, t]) for j, t in enumerate(ids)], abs=1e-4)
    assert llm.text_logprobs(prefix, texts) == got and llm.stats.cached == 3


def test_autointerp_runs_on_the_rule_simulator_and_writes_its_details(tiny_llama, tiny_sae_dir, tmp_path):
    import json

    from saebench.runner import RunConfig, evaluate

    config = RunConfig(output_dir=tmp_path / "out", progress=False, corpus="wiki")
    task = "autointerp?latents=10&min_examples=20&non_activating=20&test_examples=20&sample_tokens=8192&scorers=detection,fuzzing"
    (rec,) = evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?llm=rules"], [task], config)
    assert rec.metrics["n_latents"] == 10 and rec.extra["judge"] == "rules" and rec.metrics["n_failed"] == 0
    assert 0.0 <= rec.metrics["detection_balanced_accuracy"] <= 1.0
    rows = [json.loads(line) for line in next((tmp_path / "out" / "autointerp").glob("*.details.jsonl")).open()]
    latents = [r for r in rows if r.get("kind") == "latent"]
    assert len(latents) == 10 and all(r["explanation"].startswith("Active on the tokens") for r in latents)
    answers = [r for r in rows if r.get("kind") == "answer"]
    assert len(answers) == 10 * 40 * 2 and {r["scorer"] for r in answers} == {"detection", "fuzzing"}
    deciles = [r for r in rows if r.get("curve") == "decile"]
    assert [r["x"] for r in deciles] == list(range(11))


@pytest.mark.parametrize("task, message", [
    ("autointerp?scorers=detection,telepathy", "unknown scorer telepathy; choose among detection, fuzzing"),
    ("autointerp?scorers=embedding", "embedding needs a sentence-embedding model"),
    ("autointerp?latents=100000", "latents=100000 is more than"),
])
def test_bad_autointerp_parameters_are_one_line(tiny_llama, tiny_sae_dir, tmp_path, task, message):
    from saebench.runner import RunConfig, evaluate

    config = RunConfig(output_dir=tmp_path / "out", progress=False, corpus="wiki")
    with pytest.raises(SaebenchError, match=message):
        evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?llm=rules"], [task], config)
    assert not list((tmp_path / "out").rglob("*.json"))


def test_prompts_sharing_a_long_instruction_run_it_once_with_the_same_answers(tmp_path, tiny_tokenizer, monkeypatch):
    from saebench.llm import Chat, ResponseCache
    from saebench.llm import local
    from saebench.llm.local import TransformersLLM
    from tests.conftest import save_tiny_chat_model

    save_tiny_chat_model(tmp_path / "chat-llama", tiny_tokenizer, monkeypatch)
    llm = TransformersLLM(str(tmp_path / "chat-llama"), dtype="float32", cache=ResponseCache(None), progress=False)
    system = "the cat sat on the mat " * 20
    prompts = [Chat(system, "a short one"), Chat(system, "a much longer prompt than the first one is"), Chat(system, "x")]
    shared = llm.choice_probs(prompts, ("1", "0"))
    assert local._common_prefix([llm._encode(p) for p in prompts]) >= local.SHARED_PREFIX
    monkeypatch.setattr(local, "SHARED_PREFIX", 10**9)  # the plain left-padded path
    plain = llm.choice_probs(prompts, ("1", "0"))
    for a, b in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-5)


def test_latents_joins_scores_recall_and_harm_and_writes_delphi_files_that_read_back(tiny_llama, tiny_sae_dir,
                                                                                      tmp_path, capsys):
    import json
    from dataclasses import replace

    from saebench.cli import main
    from saebench.delphi_files import read_explanations, read_scores
    from saebench.records import RunRecord, write_record
    from saebench.runner import RunConfig, evaluate

    out = tmp_path / "runs"
    config = RunConfig(output_dir=out, progress=False, corpus="wiki")
    task = "autointerp?latents=10&min_examples=20&non_activating=20&test_examples=20&sample_tokens=8192"
    auto, recall = evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?llm=rules"], [task, "latent_recall"], config)
    latents = sorted(r["latent"] for r in _rows(out / "autointerp") if r.get("kind") == "latent")
    # a lambada record of the inner SAE with one helpful/harmful row per latent: Δlog p = latent / 100
    harm = replace(RunRecord.from_dict(auto.to_dict()), task={**auto.task, "name": "lambada"},
                   encoder=auto.encoder["params"]["inner"], details_file="harm.details.jsonl")
    (out / "lambada").mkdir()
    write_record(out / "lambada" / "harm.json", harm)
    (out / "lambada" / "harm.details.jsonl").write_text("".join(
        json.dumps({"kind": "feature", "feature": l, "controlled_delta_logp": l / 100}) + "\n" for l in latents))
    code = main(["latents", "--runs", str(out), "--out", str(tmp_path / "lat"), "--delphi", str(tmp_path / "delphi")])
    text = capsys.readouterr().out
    assert code == 0
    (scored,) = (tmp_path / "lat").glob("*.jsonl")  # explanations with their scores, as llm_sim reads them
    first = json.loads(scored.read_text().splitlines()[0])
    assert set(first["scores"]) == {"detection", "fuzzing"} and first["latent"] == latents[0]
    header = next(line for line in text.splitlines() if line.startswith("| latent |"))
    assert header.split(" | ")[1:5] == ["frequency", "detection", "fuzzing", "recall"] and "delta_logp" in header
    assert "| frequency ~ delta_logp |" in text and (tmp_path / "lat" / "latents_vs_harm.png").is_file()
    folder = next((tmp_path / "delphi").iterdir())
    module, texts = read_explanations(folder)
    assert module == "layers.1.resid_pre" and sorted(texts) == latents
    _, scores = read_scores(folder, "detection")
    answers = [r for r in _rows(out / "autointerp") if r.get("kind") == "answer" and r["scorer"] == "detection"]
    assert sum(len(v) for v in scores.values()) == len(answers)
    first = scores[latents[0]][0]
    assert set(first) == {"str_tokens", "activations", "distance", "activating", "prediction", "probability", "correct"}
    assert first["correct"] == (first["prediction"] == first["activating"])


def test_a_nearly_constant_column_enters_no_correlation_and_the_table_says_why():
    from saebench.latents_table import correlations, markdown

    def computed(rows):
        return {(c["a"], c["b"]) for c in correlations(rows) if c["rho"] is not None}

    # specificity is 1.0 on 97 of 100 latents: a rank correlation with it rests on three latents
    rows = [{"latent": i, "frequency": 0.01 * (i + 1), "explanation": "x", "fuzzing": (i * 37 % 100) / 100,
             "specificity": 0.9 if i < 3 else 1.0, "delta_logp": -0.01 * i} for i in range(100)]
    assert computed(rows) == {("frequency", "fuzzing"), ("frequency", "delta_logp"), ("fuzzing", "delta_logp")}
    (freq_harm,) = [c for c in correlations(rows) if (c["a"], c["b"]) == ("frequency", "delta_logp")]
    assert freq_harm["rho"] == pytest.approx(-1.0) and freq_harm["n"] == 100
    text = markdown([{"title": "t", "rows": rows}])
    assert "Left out: frequency ~ specificity, fuzzing ~ specificity, specificity ~ delta_logp." in text
    assert "specificity: 97 of 100 latents have the value 1.000." in text
    rows[3]["specificity"] = rows[4]["specificity"] = 0.8  # five latents off 1.0: it counts again
    assert ("fuzzing", "specificity") in computed(rows)
    # ... but only over the latents that hold both values: with Δlog p on two of those five, not against it
    for r in rows[2:5]:
        del r["delta_logp"]
    assert ("fuzzing", "specificity") in computed(rows) and ("specificity", "delta_logp") not in computed(rows)
    # a column with no finite value is no column
    for r in rows:
        r["recall"] = math.nan
    assert "| recall" not in markdown([{"title": "t", "rows": rows}])


def _rows(folder):
    import json

    return [json.loads(line) for line in next(folder.glob("*.details.jsonl")).open()]


def test_embedding_scorer_loads_a_local_sentence_transformers_model_and_ranks_matching_text(tmp_path, tiny_tokenizer):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from saebench.latent_examples import Example
    from saebench.scorers import Embedder

    torch.manual_seed(0)
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert)  # a copy with a padding token (the session's tokenizer has none)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(bert)
    word = models.Transformer(str(bert), max_seq_length=64)
    SentenceTransformer(modules=[word, models.Pooling(32, "mean")]).save(str(tmp_path / "st"))
    embedder = Embedder(str(tmp_path / "st"))
    on = ["anarchism anarchism political philosophy", "political philosophy anarchism movement"]
    off = ["the 2 3 4 5 6", "0 1 9 8 7 , ,", "( ) ) ( 12 13"]
    items = [Item(0, Example(i, [1], [1.0], 0, [t]), True) for i, t in enumerate(on)] + \
        [Item(0, Example(9 + i, [1], [0.0], -1, [t]), False) for i, t in enumerate(off)]
    embedder.score({0: "anarchism political philosophy"}, items)
    assert all(-1.0 <= it.probability <= 1.0 for it in items)
    assert classification_metrics(items)["auc"] == 1.0
    with pytest.raises(SaebenchError, match=r"embedding model '.*nowhere' could not be loaded .*embedding_model="):
        Embedder(str(tmp_path / "nowhere"))


def test_intervention_steers_at_the_last_token_calibrates_the_kl_and_scores(tiny_llama, tiny_sae_dir, tiny_tokenizer,
                                                                            tmp_path, monkeypatch):
    import json

    from saebench.forward import hookpoint_forward
    from saebench.runner import RunConfig, evaluate
    from saebench.tasks.intervention import Steerer

    forward = hookpoint_forward(tiny_llama, tiny_llama.hookpoint("layers.1.resid_pre"))
    steer = Steerer(forward, torch.randn(32, generator=torch.Generator().manual_seed(0)))
    prompts = [[1, 5, 9, 30], [7, 8], [3, 4, 5, 6, 7, 8]]
    clean = steer.last_logp(prompts, 0.0)
    assert steer.kl(prompts, 0.0, clean) == pytest.approx(0.0, abs=1e-6)
    kls = [steer.kl(prompts, s, clean) for s in (0.1, 1.0, 10.0)]
    assert kls[0] < kls[1] < kls[2]
    s, kl = steer.calibrate(prompts, 0.005)  # a random tiny model's KL saturates near 0.011
    assert kl == pytest.approx(0.005, rel=0.1) and steer.kl(prompts, s, clean) == pytest.approx(kl)
    alone = steer.last_logp([prompts[1]], s)  # right padding changes nothing before it
    assert alone[0] == pytest.approx(steer.last_logp(prompts, s)[1], abs=1e-5)
    # end to end, a tiny chat model as the judge
    from tests.conftest import save_tiny_chat_model

    judge = tmp_path / "judge"
    save_tiny_chat_model(judge, tiny_tokenizer, monkeypatch)
    config = RunConfig(output_dir=tmp_path / "out", progress=False, corpus="wiki")
    task = ("autointerp?latents=3&min_examples=20&non_activating=20&test_examples=20&sample_tokens=8192"
            "&scorers=intervention&intervention_prompts=3&target_kl=0.005")
    (rec,) = evaluate(tiny_llama, [f"llm_sim:sae:{tiny_sae_dir}?llm={judge}&explanations=tokens"], [task], config)
    rows = [json.loads(line) for line in next((tmp_path / "out" / "autointerp").glob("*.details.jsonl")).open()]
    latents = [r for r in rows if r.get("kind") == "latent"]
    assert len(latents) == 3 and all(r["intervention_kl"] == pytest.approx(0.005, rel=0.1) for r in latents)
    assert all(isinstance(r.get("intervention_score"), float) for r in latents if r["intervention_explanation"])
    assert rec.metrics["n_latents"] == 3 and "intervention_random_direction" in rec.metrics


def test_a_server_judge_refuses_surprisal_before_any_work_and_scores_detection(tiny_llama, tiny_sae_dir, tmp_path):
    from saebench.runner import RunConfig, evaluate
    from tests.unit.llm_server import FakeOpenAIServer

    small = "latents=5&min_examples=20&non_activating=20&test_examples=20&sample_tokens=8192"
    with FakeOpenAIServer() as server:
        config = RunConfig(output_dir=tmp_path / "runs", progress=False, corpus="wiki",
                           encoder_options={"llm_sim": {"llm_url": server.url}})
        spec = f"llm_sim:sae:{tiny_sae_dir}?explanations=tokens"
        with pytest.raises(SaebenchError, match="scorer surprisal reads the log-probs of given text"):
            evaluate(tiny_llama, [spec], [f"autointerp?{small}"], config)
        assert not list((tmp_path / "runs").rglob("*.json"))
        (rec,) = evaluate(tiny_llama, [spec], [f"autointerp?{small}&scorers=detection&shown=1"], config)
    assert rec.metrics["n_latents"] == 5 and rec.metrics["detection_auc"] is not None
    assert rec.extra["failed_answers"]["asked"] == 5 * 40


def test_a_simulator_can_be_told_each_explanations_score(tmp_path, tiny_llama, tiny_sae_dir):
    import json

    from saebench.explanations import load_jsonl
    from saebench.runner import RunConfig, evaluate
    from saebench.simulators import LLMSimulator

    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps({"latent": 3, "explanation": "years", "scores": {"fuzzing": 0.83, "detection": 0.7}})
                    + "\n" + json.dumps({"latent": 5, "explanation": "commas"}) + "\n")
    expl = load_jsonl(path, 64)
    assert expl.scores == {3: {"fuzzing": 0.83, "detection": 0.7}, 5: {}}

    from saebench.llm import LLMStats

    llm = type("L", (), {"label": "x", "stats": LLMStats()})()
    told = LLMSimulator(llm, expl, "fuzzing")._prompts("sys", [("a text", 1, 3), ("b text", 1, 5)], "Active?")
    assert "fuzzing score, 0.5 is chance, 1 is perfect): 0.83" in told[0].user and "score" not in told[1].user
    assert "score" not in LLMSimulator(llm, expl)._prompts("sys", [("a text", 1, 3)], "Active?")[0].user
    config = RunConfig(output_dir=tmp_path / "out", progress=False)
    for spec, message in [(f"llm_sim:sae:{tiny_sae_dir}?show_score=fuzzing", "reads scores from an explanations file"),
                          (f"llm_sim:sae:{tiny_sae_dir}?explanations={path}&missing=skip&show_score=surprisal",
                           "gives no 'surprisal' score for any latent")]:
        with pytest.raises(SaebenchError, match=message):
            evaluate(tiny_llama, [spec], ["latent_recall"], config)


def test_the_001_explainer_prompt_and_explanations_written_on_demand():
    from saebench.explanations import explainer_prompts_001, generate_explanations

    sample = token_sample()
    windows = LatentWindows(sample, Pieces())
    (prompt,) = explainer_prompts_001(windows, [4], n_examples=40, sampling="quantiles")
    lines = prompt.user.splitlines()
    assert sum(line.startswith("Excerpt ") for line in lines) == 40 and len(prompt.shots) == 1
    for excerpt, acts in zip(lines[::2], lines[1::2]):  # every excerpt marks token 14 and lists it on 1..10
        assert "<< t14>>" in excerpt and acts.startswith('Activations: (" t14": ')
        assert all(1 <= int(v) <= 10 for v in re.findall(r": (\d+)\)", acts))
    asked = []

    class FakeLLM:
        label, cache_id = "fake", "fake"

        def generate(self, prompts, max_tokens, desc=""):
            asked.extend(prompts)
            return ["Looking at the excerpts...\nExplanation: The token t14." for _ in prompts]

    expl = generate_explanations(sample, Pieces(), FakeLLM(), style="explainer")
    assert expl.texts == {} and expl.pending == set(range(D)) and expl.missing(D) == []
    expl.ensure([2, 4])
    assert expl.texts == {2: "The token t14.", 4: "The token t14."} and len(asked) == 2
    expl.ensure([2, 4, 5])
    assert len(asked) == 3 and expl.pending == {0, 1, 3} and expl.source == "explainer(quantiles,40):fake"
