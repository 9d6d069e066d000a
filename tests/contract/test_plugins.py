"""Plugins: every registered encoder and task honours the contract; third parties plug in by entry point."""

import textwrap

import pytest
import torch

from saebench.cli import main
from saebench.encoders.base import BuildContext, EncodeContext, dense
from saebench.models import cache_dir
from saebench.registry import ENCODER_GROUP, TASK_GROUP, available, load_plugin
from saebench.runner import RunConfig, evaluate

ARG_FREE = ["identity", "zero", "mean"]


def test_builtins_are_declared_through_the_entry_point_groups():
    assert {"identity", "zero", "mean", "sae"} <= set(available(ENCODER_GROUP))
    assert "ce_kl" in available(TASK_GROUP)


@pytest.mark.parametrize("name", ARG_FREE)
def test_encoder_contract(name, tiny_llama):
    enc = load_plugin(ENCODER_GROUP, name).from_arg(None, BuildContext(tiny_llama, None, cache_dir()))
    enc.prepare(type("Data", (), {"activation_mean": lambda self: torch.ones(32)})())
    acts = torch.randn(5, 32)
    ctx = EncodeContext(torch.arange(5), torch.arange(5))
    recon = enc.decode(enc.encode(acts, ctx))
    assert recon.shape == acts.shape
    assert enc.spec.d_in == 32 and enc.spec.label == name


def test_sae_encoder_contract_on_a_sae_lens_directory(tiny_llama, tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=4, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
            ).save_model(tmp_path / "sae")
    enc = load_plugin(ENCODER_GROUP, "sae").from_arg(str(tmp_path / "sae"), BuildContext(tiny_llama, None, cache_dir()))
    assert enc.spec.hookpoint == "layers.1.resid_pre" and enc.spec.d_latent == 128
    codes = enc.encode(torch.randn(6, 32), EncodeContext(torch.arange(6), torch.arange(6)))
    assert (dense(codes) != 0).sum(1).max() <= 4
    assert enc.decode(codes).shape == (6, 32)
    assert "decoder_dictionary" in enc.capabilities and enc.W_dec.shape == (128, 32)


@pytest.mark.parametrize("name", sorted(available(TASK_GROUP)))
def test_task_contract(name):
    spec = load_plugin(TASK_GROUP, name).spec
    assert spec.headline in {m.name for m in spec.metrics}
    assert set(spec.summary_metrics()) <= {m.name for m in spec.metrics}
    assert isinstance(spec.version, int)


PLUGIN = textwrap.dedent('''
    from saebench.encoders.base import Encoder, EncoderSpec

    class ScaleEncoder(Encoder):
        """Third-party encoder: reconstructs x * factor."""

        def __init__(self, d, factor):
            self.factor = factor
            self.spec = EncoderSpec("scale", str(factor), None, d, None, {"factor": factor})

        @classmethod
        def from_arg(cls, arg, build):
            return cls(build.model.d_model, float(arg or 1.0))

        def encode(self, acts, context):
            return acts * self.factor

        def decode(self, codes):
            return codes
''')


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A package 'saebench-scale' installed only as a dist-info folder on sys.path."""
    (tmp_path / "scale_plugin.py").write_text(PLUGIN)
    info = tmp_path / "saebench_scale-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: saebench-scale\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[saebench.encoders]\nscale = scale_plugin:ScaleEncoder\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_third_party_encoder_shows_up_and_runs(fake_distribution, tiny_llama, tmp_path, capsys):
    assert main(["list", "encoders"]) == 0
    listed = capsys.readouterr().out
    assert "scale" in listed and "saebench-scale 1.2.3" in listed
    recs = evaluate(tiny_llama, ["scale:1.0", "scale:0.0", "zero"], ["ce_kl"],
                    RunConfig(limit=128, context_len=16, output_dir=tmp_path / "runs", progress=False))
    by = {r.encoder["label"]: r for r in recs}
    assert abs(by["scale:1.0"].metrics["ce_loss_recovered"] - 1) < 1e-6
    assert by["scale:0.0"].metrics["ce_spliced"] == by["zero"].metrics["ce_spliced"]
    assert by["scale:1.0"].encoder["plugin"] == {"distribution": "saebench-scale", "version": "1.2.3"}


@pytest.mark.parametrize("name", sorted(available(TASK_GROUP)))
def test_task_spec_round_trips_through_a_record(name):
    from saebench.tasks.base import TaskSpec

    spec = load_plugin(TASK_GROUP, name).spec
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert spec.limit_unit in ("tokens", "items", "samples") and spec.stderr_method
