"""Random-weight presets: published shapes built from transformers' config classes, seeded, never a trained model.

Llama-3.2-1B and Gemma-2-2B are checked on the meta device (shapes and parameter counts, no weights
allocated); GPT-2 small is built for real and runs ce_kl.
"""

import json

import pytest
import torch

from saebench import RunConfig, evaluate
from saebench.cli import main
from saebench.errors import SaebenchError
from saebench.leaderboard import RANDOM_WEIGHTS_PREFIX as OUTPUT_PREFIX
from saebench.models import RANDOM_WEIGHTS_PREFIX, LoadedModel, load_model, model_presets, random_config

# name: (model type, d_model, layers, vocab, parameters in millions as published, a hookpoint inside a layer)
SHAPES = {
    "random-gpt2-small": ("gpt2", 768, 12, 50257, 124.4, "layers.11.mlp_out"),
    "random-llama-3.2-1b": ("llama", 2048, 16, 128256, 1235.8, "layers.15.attn_out"),
    "random-gemma-2-2b": ("gemma2", 2304, 26, 256000, 2614.3, "layers.25.attn_out"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_presets_have_the_published_shapes(name):
    from transformers import AutoModelForCausalLM

    model_type, d_model, layers, vocab, millions, inside = SHAPES[name]
    with torch.device("meta"):  # no weights allocated: 2.6B parameters would be 5-10 GB
        model = AutoModelForCausalLM.from_config(random_config(name))
    lm = LoadedModel(name, "", None, model, None, "float32", "meta", model_presets()[name]["default_hookpoint"])
    assert (lm.model_type, lm.d_model, len(lm.layers()), model.config.vocab_size) == (model_type, d_model, layers, vocab)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)  # lm_head tied
    assert len(lm.hookpoint_names()) == 4 * layers and lm.hookpoint(inside).inside_layer
    lm.hookpoint(lm.default_hookpoint)


def test_gemma_and_llama_configs_keep_what_sets_their_cost():
    gemma, llama = random_config("random-gemma-2-2b"), random_config("random-llama-3.2-1b")
    assert (gemma.head_dim, gemma.num_key_value_heads, gemma.sliding_window, gemma.query_pre_attn_scalar) == (256, 4, 4096, 256)
    assert (gemma.attn_logit_softcapping, gemma.final_logit_softcapping, gemma.intermediate_size) == (50.0, 30.0, 9216)
    rope = llama.rope_parameters if hasattr(llama, "rope_parameters") else {**llama.rope_scaling, "rope_theta": llama.rope_theta}
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 32.0
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.max_position_embeddings) == (8, 8192, 131072)


def test_same_seed_same_weights(monkeypatch, tmp_path, tiny_tokenizer):
    """A 2-layer Llama preset (same code path as the real ones): seed-0 twice is bitwise equal, seed-1 differs."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")  # a local tokenizer preset: no embedded model to convert
    tiny = {"random": {"shape_of": "tiny/llama", "config": "LlamaConfig", "seed": 0, "tokenizer": "tok",
                       "kwargs": {"vocab_size": 512, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}}}
    fake = {**model_presets(), "random-tiny": tiny, "tok": {"hub_id": str(tmp_path / "tok")}}
    monkeypatch.setattr("saebench.models.model_presets", lambda: fake)
    a, b = load_model("random-tiny", "float32", "cpu"), load_model("random-tiny", "float32", "cpu", revision="seed-0")
    c = load_model("random-tiny", "float32", "cpu", revision="seed-1")
    assert (a.model_id, a.revision, c.revision) == ("random-weights:tiny/llama", "seed-0", "seed-1")
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    with pytest.raises(SaebenchError, match="--revision must be seed-N"):
        load_model("random-tiny", "float32", "cpu", revision="main")


@pytest.mark.slow
def test_random_gpt2_small_runs_ce_kl_and_stays_out_of_trained_tables(tmp_path):
    lm = load_model("random-gpt2-small", "float32", "cpu")
    assert RANDOM_WEIGHTS_PREFIX == OUTPUT_PREFIX and lm.model_id == "random-weights:openai-community/gpt2"
    assert len(lm.tokenizer) == 49152 < lm.model.config.vocab_size and lm.bos_id == lm.tokenizer.bos_token_id
    assert lm.model.lm_head.weight.shape == (50257, 768) and lm.max_positions == 1024
    recs = evaluate(lm, ["identity", "zero"], ["ce_kl"], RunConfig(limit=256, output_dir=tmp_path / "runs",
                                                                   cache_references=False, progress=False))
    assert {r.model["id"] for r in recs} == {"random-weights:openai-community/gpt2"}
    assert {r.model["revision"] for r in recs} == {"seed-0"}
    assert [r.metrics["ce_loss_recovered"] for r in recs] == [pytest.approx(1.0), pytest.approx(0.0, abs=1e-6)]
    # the same record as if from the trained GPT-2: it gets a table of its own, unmarked
    path = next(p for p in (tmp_path / "runs").rglob("*.json") if json.loads(p.read_text()).get("model"))
    data = json.loads(path.read_text())
    data["model"] |= {"id": "openai-community/gpt2", "revision": None}
    (path.parent / "trained.json").write_text(json.dumps(data))
    assert main(["leaderboard", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    headings = [line for line in (tmp_path / "lb" / "ce_kl.md").read_text().splitlines() if line.startswith("## ")]
    assert headings == ["## ce_kl v%d · openai-community/gpt2 (float32)" % data["task"]["version"],
                        "## ce_kl v%d · random-weights:openai-community/gpt2 (float32, revision seed-0) · random "
                        "weights, not a trained model" % data["task"]["version"]]
