import pytest
import torch
from torch import nn

from saebench.encoders.baselines import IdentityEncoder, ZeroEncoder
from saebench.errors import SaebenchError
from saebench.splice import Splice, SpliceConfig, hook_at, sink_mask
from tests.conftest import make_tiny

ARCHS = ["llama", "gpt2", "gpt_neox", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_hookpoints_read_the_residual_stream(arch, kind, tiny_tokenizer):
    lm = make_tiny(arch, tiny_tokenizer)
    assert len(lm.hookpoint_names()) == 8
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    # hidden_states[i] is the input of layer i (the last entry is after the final norm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    seen = []
    with hook_at(lm.hookpoint(f"layers.0.{kind}"), lambda h: seen.append(h.detach()) or None):
        lm.model(ids)
    assert seen[0].shape == (2, 10, 32)
    torch.testing.assert_close(seen[0], hidden[0 if kind == "resid_pre" else 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_post_of_layer0_equals_resid_pre_of_layer1(arch, tiny_tokenizer):
    lm = make_tiny(arch, tiny_tokenizer)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    got = {}
    for name in ("layers.0.resid_post", "layers.1.resid_pre"):
        with hook_at(lm.hookpoint(name), lambda h, n=name: got.update({n: h.detach()})):
            lm.model(ids)
    torch.testing.assert_close(got["layers.0.resid_post"], got["layers.1.resid_pre"])


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_out_and_mlp_out_are_what_the_layer_adds_to_the_residual_stream(arch, tiny_tokenizer):
    """resid_post = resid_pre + attn_out + mlp_out, with each read from the model's own hidden states."""
    lm = make_tiny(arch, tiny_tokenizer)
    assert len(lm.hookpoint_names()) == 8
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10))
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    got = {}
    for kind in ("attn_out", "mlp_out"):
        with hook_at(lm.hookpoint(f"blocks.0.hook_{kind}"), lambda h, k=kind: got.update({k: h.detach()})):
            lm.model(ids)
    assert not torch.allclose(got["attn_out"], torch.zeros_like(got["attn_out"]))
    torch.testing.assert_close(hidden[0] + got["attn_out"] + got["mlp_out"], hidden[1], atol=1e-5, rtol=1e-5)


def test_sub_layer_hookpoints_of_an_unknown_model_type_are_an_error(tiny_llama, monkeypatch):
    monkeypatch.setattr(tiny_llama.model.config, "model_type", "mystery")
    with pytest.raises(SaebenchError, match="does not know which of its modules give mlp_out"):
        tiny_llama.hookpoint("layers.0.mlp_out")
    assert tiny_llama.hookpoint("layers.0.resid_post").kind == "resid_post"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_identity_splice_is_exact_and_zero_splice_changes_logits(arch, kind, tiny_tokenizer):
    lm = make_tiny(arch, tiny_tokenizer)
    ids = torch.randint(2, len(tiny_tokenizer), (2, 12))
    ids[:, 0] = lm.bos_id
    clean = lm.model(ids).logits
    hp = lm.hookpoint(f"layers.1.{kind}")
    keep = sink_mask(ids, lm.bos_id)
    for enc, same in ((IdentityEncoder(32), True), (ZeroEncoder(32), False)):
        splice = Splice(hp, enc, SpliceConfig())
        splice.set_batch(ids, keep)
        with splice.installed():
            spliced = lm.model(ids).logits
        assert torch.equal(spliced, clean) == same
        # the sink position is passed through, so its logits never change
        assert torch.equal(spliced[:, 0], clean[:, 0])


def test_hook_is_removed_when_an_exception_escapes(tiny_llama):
    hp = tiny_llama.hookpoint("layers.0.resid_post")

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with hook_at(hp, boom):
            tiny_llama.model(torch.tensor([[1, 2, 3]]))
    assert not hp.module._forward_hooks and not hp.module._forward_pre_hooks
    tiny_llama.model(torch.tensor([[1, 2, 3]]))  # runs clean again


def test_tuple_outputs_are_spliced():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return (x * 2, "extra")

    from saebench.models import Hookpoint

    layer = TupleLayer()
    hp = Hookpoint("layers.0.resid_post", 0, "resid_post", layer)
    ids = torch.tensor([[0, 5, 6]])
    splice = Splice(hp, ZeroEncoder(4), SpliceConfig())
    splice.set_batch(ids, sink_mask(ids, 0))
    with splice.installed():
        out, extra = layer(torch.ones(1, 3, 4))
    assert extra == "extra"
    assert out[0, 0].tolist() == [2.0] * 4 and out[0, 1:].abs().sum() == 0


def test_unknown_hookpoint_lists_valid_ones(tiny_llama):
    with pytest.raises(SaebenchError, match=r"layers.0.resid_pre .. layers.1.resid_pre"):
        tiny_llama.hookpoint("layers.7.resid_post")
    with pytest.raises(SaebenchError, match="no hookpoint 'mlp.3'"):
        tiny_llama.hookpoint("mlp.3")
    assert tiny_llama.hookpoint("blocks.1.hook_resid_pre").name == "layers.1.resid_pre"


def test_unknown_architecture_is_an_error_not_a_guess():
    from saebench.models import decoder_layers

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(SaebenchError, match="cannot find the decoder layers of Odd"):
        decoder_layers(Odd())
