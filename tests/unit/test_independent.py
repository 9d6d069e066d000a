"""ce_kl against an independent plain-torch computation: nothing shared but the model and the tokens.

The reference below uses its own forward pre-hook, its own sink mask, its own log-softmax, KL
and variance sums, and its own zero ablation; saebench's run goes through its prefix reuse,
reference cache and chunked vocabulary maths. They must agree to 1e-6.
"""

import pytest
import torch

from saebench import RunConfig
from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import EncodeContext, Encoder, EncoderSpec
from saebench.encoders.baselines import IdentityEncoder, ZeroEncoder
from saebench.runner import _run_task, resolve_task
from tests.unit.tiny_lm import ReluLatentEncoder

HOOKPOINT = "layers.1.resid_pre"


class FixedLinearMap(Encoder):
    """x -> x M for a fixed random M near the identity; no latents."""

    def __init__(self, d: int):
        self.spec = EncoderSpec("linear_map", None, None, d, None)
        gen = torch.Generator().manual_seed(5)
        self.m = 0.6 * torch.eye(d) + 0.6 * torch.randn(d, d, generator=gen) / d**0.5

    @classmethod
    def from_arg(cls, arg, build):
        return cls(build.model.d_model)

    def encode(self, acts, context: EncodeContext):
        return acts.float() @ self.m

    def decode(self, codes):
        return codes


def _reference(model, tokens, transform):
    """Plain torch: logits with layer 1's input replaced by transform(x) at non-sink positions."""
    bos = model.bos_id
    sink = (tokens == bos)
    sink[:, 0] = True
    seen = {}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["x"] = hidden.detach().clone()
        if transform is None:
            return None
        new = hidden.clone()
        new[~sink] = transform(hidden[~sink])
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = model.model.model.layers[1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model.model(tokens).logits.double()
    finally:
        handle.remove()
    return logits, seen["x"].double(), sink


def test_ce_kl_matches_an_independent_computation(tiny_llama, tmp_path):
    tokens = token_contexts(tiny_llama.tokenizer, CorpusSpec(), 32, 24 * 32, 0, tiny_llama.bos_id)
    relu, linear = ReluLatentEncoder(32), FixedLinearMap(32)
    config = RunConfig(limit=24 * 32, context_len=32, batch_size=8, output_dir=tmp_path, progress=False)
    user = [IdentityEncoder(32), ZeroEncoder(32)]
    recs = {r.encoder["label"]: r.metrics
            for r in _run_task(resolve_task("ce_kl"), tiny_llama, {HOOKPOINT: [relu, linear, *user]}, config)}

    clean, x, sink = _reference(tiny_llama, tokens, None)
    zero, _, _ = _reference(tiny_llama, tokens, lambda h: torch.zeros_like(h))
    pred = ~sink[:, :-1] & ~sink[:, 1:]  # predictions from non-sink positions whose target is not BOS
    targets = tokens[:, 1:]

    def ce(logits):
        logp = torch.log_softmax(logits[:, :-1], -1)
        return -logp.gather(-1, targets[..., None]).squeeze(-1)[pred].mean().item()

    xs = x[~sink]
    for label, enc in (("relu_test", relu), ("linear_map", linear)):
        transform = (lambda h, e=enc: e.decode(e.encode(h.float(), None)).to(h.dtype))
        spliced, _, _ = _reference(tiny_llama, tokens, transform)
        lp_c, lp_s = torch.log_softmax(clean[:, :-1], -1), torch.log_softmax(spliced[:, :-1], -1)
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)[pred].mean().item()
        recon = enc.decode(enc.encode(xs.float(), None)).double()
        fve = 1 - ((xs - recon) ** 2).sum().item() / ((xs - xs.mean(0)) ** 2).sum().item()
        ce_c, ce_s, ce_z = ce(clean), ce(spliced), ce(zero)
        expected = {"ce_clean": ce_c, "ce_spliced": ce_s, "ce_zero": ce_z, "kl": kl, "fve": fve,
                    "ce_loss_recovered": (ce_z - ce_s) / (ce_z - ce_c)}
        if label == "relu_test":
            expected["l0"] = (enc.encode(xs.float(), None) > 0).sum(1).double().mean().item()
        got = recs[label]
        # CE, KL, FVE and L0 to 1e-6; the ratio inherits that error divided by its denominator
        # (this random tiny model's zero ablation costs little: ce_zero - ce_clean is small)
        tolerance = {"ce_loss_recovered": 3e-6 / abs(ce_z - ce_c)}
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=tolerance.get(name, 1e-6)), (label, name, got[name], value)
        assert got["kl"] > 1e-4  # non-trivial encoders (100x the tolerance), so a wrong splice would show
    # the user's identity and zero encoders against the clean and zero passes computed here, not
    # against saebench's own reference passes (which a user's `zero` would otherwise be compared with)
    ce_c, ce_z = ce(clean), ce(zero)
    for label, ce_expected in (("identity", ce_c), ("zero", ce_z)):
        assert recs[label]["ce_spliced"] == pytest.approx(ce_expected, abs=1e-6), label
        assert recs[label]["ce_clean"] == pytest.approx(ce_c, abs=1e-6)
    assert recs["identity"]["kl"] == pytest.approx(0, abs=1e-9) and recs["identity"]["fve"] == pytest.approx(1)
    assert recs["zero"]["ce_loss_recovered"] == pytest.approx(0, abs=3e-6 / abs(ce_z - ce_c))
