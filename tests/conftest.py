"""Shared fixtures: a tiny tokenizer and tiny random-weight models built locally (no hub); a guard that fails a
test which leaves a thread running."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from saebench.models import LoadedModel
from tests.unit.llm_server import THREAD_PREFIX

LEAK_GRACE_SECONDS = 2.0

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one torch thread in each, and in the processes its tests
    # start, so that the workers do not oversubscribe the cores (and a test comparing its own numbers with a
    # child process's bit for bit has the same threads on both sides)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TEXT = ("The quick brown fox jumps over the lazy dog. Anarchism is a political philosophy. "
        "Sparse autoencoders decompose activations into features. ") * 20


@pytest.fixture(scope="session", autouse=True)
def saebench_cache(tmp_path_factory) -> Path:
    """Each test session gets its own cache unless SAEBENCH_TEST_CACHE points at a shared one."""
    path = Path(os.environ.get("SAEBENCH_TEST_CACHE") or tmp_path_factory.mktemp("saebench-cache"))
    os.environ["SAEBENCH_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail the test that leaves a thread running: a non-daemon one, or any of the fake LLM server's (daemon,
    but a leaked one once wrote a BrokenPipeError traceback into a later test's captured stderr). Threads
    started by session or module fixtures are there before the test and are not counted."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate()
              if t not in before and (not t.daemon or t.name.startswith(THREAD_PREFIX))]
    deadline = time.monotonic() + LEAK_GRACE_SECONDS  # one grace period for all of them: a thread may be ending
    for thread in leaked:
        thread.join(max(0.0, deadline - time.monotonic()))
    if alive := [t.name for t in leaked if t.is_alive()]:
        pytest.fail(f"the test left threads running: {', '.join(alive)}; stop them in the test or its fixture",
                    pytrace=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str, vocab: int):
    """A 2-layer config of each architecture family saebench resolves hookpoints for."""
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256)
    if arch == "gemma2":
        return Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    raise ValueError(arch)


def make_tiny(arch: str, tokenizer, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer))).eval()
    return LoadedModel(f"tiny-{arch}", f"tiny-{arch}", None, model, tokenizer, "float32", "cpu", "layers.1.resid_pre")


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LoadedModel:
    return make_tiny("llama", tiny_tokenizer)


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a local model folder, loadable by path."""
    loaded = make_tiny("llama", tiny_tokenizer)
    path = tmp_path / "tiny-llama"
    loaded.model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def save_tiny_topk_sae(path: Path, k: int = 4) -> Path:
    """A sae-lens TopK SAE (32 -> 64 latents, seed 0) for the tiny models' layers.1.resid_pre, saved at `path`."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=k, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
            ).save_model(path)
    return path


@pytest.fixture
def tiny_sae_dir(tmp_path) -> Path:
    """A tiny TopK SAE (k=4) saved in sae-lens format."""
    return save_tiny_topk_sae(tmp_path / "sae")


def save_tiny_chat_model(path: Path, tokenizer, monkeypatch, arch: str = "llama") -> LoadedModel:
    """A tiny model saved at `path` with a plain chat template (monkeypatched on the session's tokenizer, undone
    after the test), loadable as an in-process LLM."""
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    model = make_tiny(arch, tokenizer)
    model.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
