"""ce_kl --all-at-once: encoders at several hookpoints spliced in one pass, against plain torch."""

import pytest
import torch

from saebench import RunConfig, evaluate
from saebench.errors import SaebenchError
from saebench.splice import sink_mask
from tests.unit.tiny_lm import ReluLatentEncoder


def _config(tmp_path, **kw):
    return RunConfig(limit=96, context_len=16, batch_size=3, output_dir=tmp_path, progress=False,
                     task_params={"all_at_once": True}, **kw)


def test_identity_everywhere_loses_nothing_and_rows_sit_beside_the_single_ones(tiny_llama, tmp_path):
    recs = evaluate(tiny_llama, ["identity@layers.{0,1}.resid_post", "zero@layers.0.resid_post"], ["ce_kl"],
                    _config(tmp_path))
    rows = {(r.encoder["label"], r.hookpoint): r for r in recs}
    joint = rows[("joint:identity", "layers.{0,1}.resid_post")]
    assert joint.metrics["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert joint.metrics["kl"] == pytest.approx(0.0, abs=1e-5) and joint.metrics["fve"] is None
    assert ("identity", "layers.0.resid_post") in rows and ("zero", "layers.0.resid_post") in rows
    # zero-ablating layer 1's output makes layer 0's irrelevant: the joint zero is layer 1's zero
    assert joint.metrics["ce_zero"] == pytest.approx(rows[("identity", "layers.1.resid_post")].metrics["ce_zero"])


@torch.no_grad()
def test_joint_ce_matches_splicing_with_plain_hooks(tiny_llama, tmp_path):
    from saebench.runner import _run_task, resolve_task

    encs = {hp: ReluLatentEncoder(tiny_llama.d_model, hookpoint=hp) for hp in ("layers.0.resid_post",
                                                                               "layers.1.mlp_out")}
    config = _config(tmp_path)
    recs = _run_task(resolve_task("ce_kl", {"all_at_once": True}), tiny_llama, {hp: [e] for hp, e in encs.items()},
                     config)
    joint = next(r for r in recs if r.encoder["name"] == "joint")
    assert joint.hookpoint == "layers.0.resid_post+layers.1.mlp_out"
    from saebench.corpus import CorpusSpec, token_contexts

    tokens = token_contexts(tiny_llama.tokenizer, CorpusSpec("wiki"), 16, 96, 0, tiny_llama.bos_id)
    sinks = sink_mask(tokens, tiny_llama.bos_id)
    enc0, enc1 = encs.values()

    def replace(enc):
        def hook(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            recon = enc.decode(enc.encode(h.reshape(-1, h.shape[-1]), None)).view_as(h).to(h.dtype)
            new = torch.where(sinks[..., None], h, recon)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])
        return hook

    handles = [tiny_llama.layers()[0].register_forward_hook(replace(enc0)),
               tiny_llama.layers()[1].mlp.register_forward_hook(replace(enc1))]
    try:
        logits = tiny_llama.model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    scored = ~sinks[:, :-1] & ~sinks[:, 1:]
    assert joint.metrics["ce_spliced"] == pytest.approx(ce[scored].mean().item(), rel=1e-5)


def test_all_at_once_without_a_repeated_encoder_is_one_clear_error(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="give one at two or more"):
        evaluate(tiny_llama, ["identity"], ["ce_kl"], _config(tmp_path))


def test_joint_row_from_the_reference_cache_equals_a_fresh_clean_pass(tiny_llama, tmp_path, monkeypatch):
    from saebench.tasks import ce_kl_joint

    encoders = [ReluLatentEncoder(tiny_llama.d_model, hookpoint=hp) for hp in ("layers.0.resid_post",
                                                                                "layers.1.resid_post")]
    from saebench.runner import _run_task, resolve_task

    task = resolve_task("ce_kl", {"all_at_once": True})
    groups = {e.spec.hookpoint: [e] for e in encoders}
    with monkeypatch.context() as patch:  # layer 0's own run fills the cache: the joint pass needs no clean pass
        patch.setattr(ce_kl_joint, "capture_all", lambda *a: pytest.fail("the clean pass ran again"))
        cached = _run_task(task, tiny_llama, groups, _config(tmp_path / "a"))
    fresh = _run_task(task, tiny_llama, groups, _config(tmp_path / "b", cache_references=False))
    joint_cached, joint_fresh = (next(r for r in recs if r.encoder["name"] == "joint") for recs in (cached, fresh))
    for name in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "ce_loss_recovered"):
        assert joint_cached.metrics[name] == pytest.approx(joint_fresh.metrics[name], rel=1e-6, abs=1e-7)
