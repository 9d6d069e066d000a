"""Speed-ups that must not change a number: prefix reuse, cached reference passes, dtype auto."""

import pytest
import torch

from saebench import RunConfig
from saebench.encoders.base import EncodeContext, Encoder, EncoderSpec
from saebench.encoders.baselines import IdentityEncoder, MeanEncoder, ZeroEncoder
from saebench.forward import HookpointForward
from saebench.models import native_bf16, resolve_dtype
from saebench.runner import _run_task, resolve_task
from tests.conftest import make_tiny

ARCHS = ["llama", "gpt2", "gpt_neox", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hookpoint", ["layers.0.resid_pre", "layers.0.resid_post", "layers.1.resid_post",
                                       "layers.0.attn_out", "layers.1.mlp_out"])
def test_resumed_suffix_equals_the_full_pass(arch, hookpoint, tiny_tokenizer):
    model = make_tiny(arch, tiny_tokenizer)
    fast = HookpointForward(model, model.hookpoint(hookpoint))
    full = HookpointForward(model, model.hookpoint(hookpoint), reuse_prefix=False)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 24), generator=torch.Generator().manual_seed(1))
    acts = fast.capture(ids)
    assert fast.reuse_prefix, "the suffix should run on this architecture"
    assert torch.equal(acts, full.capture(ids)) and torch.equal(fast.capture(ids), acts)
    replaced = acts + torch.randn(acts.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fast.resume(replaced, ids).logits, full.resume(replaced, ids).logits, atol=1e-6)
    other = torch.randint(0, len(tiny_tokenizer), (3, 24), generator=torch.Generator().manual_seed(4))
    # another batch resumed without a capture first (as from cached references): inside-layer
    # hookpoints then need that batch's own clean layer input, not the last one captured
    replaced = full.capture(other) * 0.5
    assert torch.allclose(fast.resume(replaced, other).logits, full.resume(replaced, other).logits, atol=1e-6)


class NoisyEncoder(Encoder):
    """x -> x + x A B with a fixed random low-rank A B: a non-trivial, deterministic reconstruction."""

    def __init__(self, d: int):
        self.spec = EncoderSpec("noisy", None, None, d, None)
        gen = torch.Generator().manual_seed(3)
        self.a, self.b = torch.randn(d, 4, generator=gen) / d**0.5, torch.randn(4, d, generator=gen)

    @classmethod
    def from_arg(cls, arg, build):
        return cls(build.model.d_model)

    def encode(self, acts, context: EncodeContext):
        return acts + acts @ self.a @ self.b

    def decode(self, codes):
        return codes


def _ce_kl(model, labels, tmp_path, name, hookpoint="layers.1.resid_pre", **kw):
    """ce_kl metrics per encoder label, run on fresh encoder objects."""
    config = RunConfig(limit=24 * 32, context_len=32, batch_size=8, output_dir=tmp_path / name, progress=False, **kw)
    make = {"identity": IdentityEncoder, "zero": ZeroEncoder, "mean": MeanEncoder, "noisy": NoisyEncoder}
    encoders = [make[label](model.d_model) for label in labels]
    return {r.encoder["label"]: r.metrics for r in _run_task(resolve_task("ce_kl"), model, {hookpoint: encoders}, config)}


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) for k in a if a[k] is not None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hp", ["layers.0.resid_post", "layers.0.mlp_out"])
def test_ce_kl_is_the_same_with_and_without_the_speed_ups(arch, hp, tiny_tokenizer, tmp_path):
    model = make_tiny(arch, tiny_tokenizer)
    slow = _ce_kl(model, ["identity", "zero", "mean", "noisy"], tmp_path, "slow", hp,
                  reuse_prefix=False, cache_references=False)
    fast = _ce_kl(model, ["identity", "zero", "mean", "noisy"], tmp_path, "fast", hp)
    for label in slow:
        assert _max_abs_diff(slow[label], fast[label]) < 1e-9, label
    assert slow["noisy"]["kl"] > 1e-5  # a non-trivial encoder, 10^4 x the tolerance, so the comparison can fail


def _count_layer_calls(model) -> list[int]:
    calls = [0, 0]
    for i, layer in enumerate(model.layers()):
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))  # completed runs
    return calls


def test_warm_reference_cache_skips_the_reference_passes_and_gives_the_same_numbers(tiny_llama, tmp_path):
    calls = _count_layer_calls(tiny_llama)  # hookpoint layers.1.resid_pre: layer 0 below it, layer 1 above
    cold = _ce_kl(tiny_llama, ["noisy"], tmp_path, "cold", seed=11)  # a seed no other test uses: a cold cache
    # 3 batches. Below: one pass per batch (the first a full pass recording the batch shape).
    # Above: that full pass, its check of the suffix, and clean, zero, mean and noisy per batch.
    assert calls == [3, 2 + 4 * 3]
    calls[:] = [0, 0]
    warm = _ce_kl(tiny_llama, ["noisy"], tmp_path, "warm", seed=11)
    assert warm["noisy"] == cold["noisy"]
    # warm, same process (the batch shape is known): below the hookpoint only the first batch,
    # checking the model still gives the stored activations; above it only the noisy encoder's
    # pass per batch (the clean logits come from the cached final-norm output and the LM head)
    assert calls == [1, 3]


def test_a_cache_entry_of_another_model_state_is_not_used(tiny_llama, tmp_path, capsys):
    first = _ce_kl(tiny_llama, ["noisy"], tmp_path, "a", seed=12)
    with torch.no_grad():  # same model id, other weights
        tiny_llama.model.model.embed_tokens.weight.mul_(1.5)
    changed = _ce_kl(tiny_llama, ["noisy"], tmp_path, "b", seed=12)
    assert "activations on the first batch differ from the stored ones" in capsys.readouterr().err
    uncached = _ce_kl(tiny_llama, ["noisy"], tmp_path, "c", seed=12, cache_references=False)
    assert changed == uncached and changed != first


def test_corrupt_or_partial_cache_entries_are_recomputed(tiny_llama, tmp_path, saebench_cache, capsys):
    first = _ce_kl(tiny_llama, ["noisy"], tmp_path, "a", seed=7)
    [entry] = [p for p in (saebench_cache / "reference").iterdir()
               if '"seed": 7' in (p / "meta.json").read_text()]
    data = entry / "data.safetensors"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    again = _ce_kl(tiny_llama, ["noisy"], tmp_path, "b", seed=7)
    assert "unusable (checksum mismatch); recomputing" in capsys.readouterr().err
    assert again == first
    (entry / "meta.json").unlink()  # as if a writer died before publishing its manifest
    assert _ce_kl(tiny_llama, ["noisy"], tmp_path, "c", seed=7) == first
    assert "unusable" in capsys.readouterr().err and (entry / "meta.json").exists()


def test_dtype_auto_follows_the_hardware(monkeypatch):
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert native_bf16("cpu") and resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"  # AVX512 without bf16 units: emulated bf16 is slow
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # kernels capped at AVX2
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "mps") == "float32"


def test_unknown_head_falls_back_to_full_passes_with_a_notice(tiny_llama, monkeypatch):
    import saebench.forward as forward

    monkeypatch.setattr(forward, "FINAL_NORM_PATHS", {})
    notices: list[str] = []
    fwd = HookpointForward(tiny_llama, tiny_llama.hookpoint("layers.1.resid_pre"), notice=notices.append)
    assert not fwd.reuse_prefix and "does not know its final norm and LM head" in notices[0]
    ids = torch.randint(0, 100, (2, 12))
    acts = fwd.capture(ids)
    assert torch.equal(fwd.resume(acts, ids).logits, tiny_llama.model(ids, use_cache=False).logits)


def test_a_suffix_that_disagrees_with_the_full_pass_is_switched_off(tiny_llama, monkeypatch):
    notices: list[str] = []
    fwd = HookpointForward(tiny_llama, tiny_llama.hookpoint("layers.1.resid_pre"), notice=notices.append)
    real = fwd._suffix

    def wrong(hidden, ids, logits=True):  # as if a layer needed an input the recorded arguments do not carry
        out = real(hidden, ids, logits)
        return type(out)(None if out.logits is None else out.logits + 1.0, out.normed + 1.0)

    monkeypatch.setattr(fwd, "_suffix", wrong)
    ids = torch.randint(0, 100, (2, 12))
    acts = fwd.capture(ids)
    assert not fwd.reuse_prefix and "changed the final norm's output" in notices[0]
    assert torch.equal(fwd.resume(acts, ids).logits, tiny_llama.model(ids, use_cache=False).logits)


def test_a_cache_entry_serves_a_run_without_prefix_reuse(tiny_llama, tmp_path):
    with_reuse = _ce_kl(tiny_llama, ["noisy"], tmp_path, "a", seed=13)  # stores the final-norm output too
    without = _ce_kl(tiny_llama, ["noisy"], tmp_path, "b", seed=13, reuse_prefix=False)  # warm, full passes
    assert without == with_reuse
