"""Encoder spec strings: @hookpoint, brace patterns, options, presets; and bad specs."""

import pytest

from saebench import RunConfig, evaluate
from saebench.encoders.specs import apply_options, expand_braces, expand_encoder_specs, split_hookpoint, split_options
from saebench.errors import SaebenchError
from saebench.encoders.default_sae import DefaultSAEConfig


def test_braces_expand_lists_and_ranges():
    assert expand_braces("sae:default@layers.{5,15,25}.resid_post") == [
        "sae:default@layers.5.resid_post", "sae:default@layers.15.resid_post", "sae:default@layers.25.resid_post"]
    assert expand_braces("x{0..2}y{a,b}") == ["x0ya", "x0yb", "x1ya", "x1yb", "x2ya", "x2yb"]
    for bad in ("layers.{5,}.resid_post", "layers.{a..3}.x", "layers.{5.resid_post"):
        with pytest.raises(SaebenchError):
            expand_braces(bad)


def test_hookpoint_and_options_split_off():
    assert split_hookpoint("sae:default?k=64@layers.5.resid_post") == ("sae:default?k=64", "layers.5.resid_post")
    assert split_hookpoint("sae:/data/my@sae") == ("sae:/data/my", "sae")  # caught later as a bad hookpoint
    assert split_hookpoint("identity") == ("identity", None)
    assert split_options("default?context_len=1024&k=64") == ("default", {"context_len": "1024", "k": "64"})
    cfg = apply_options(DefaultSAEConfig(), {"context_len": "1024"}, "sae:default")
    assert cfg.context_len == 1024 and isinstance(cfg.context_len, int)
    with pytest.raises(SaebenchError, match="sae:default has no option 'ctx'"):
        apply_options(DefaultSAEConfig(), {"ctx": "1"}, "sae:default")
    with pytest.raises(SaebenchError, match="option k='many' of sae:default must be an integer"):
        apply_options(DefaultSAEConfig(), {"k": "many"}, "sae:default")


def test_presets_stand_for_their_lists():
    specs = expand_encoder_specs(["gpt2-small-res-jb"])
    assert specs[0] == "sae:gpt2-small-res-jb/blocks.0.hook_resid_pre" and len(specs) == 12


def test_a_pattern_reaching_a_missing_layer_is_one_clear_error(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="has no hookpoint 'layers.5.resid_post'"):
        evaluate(tiny_llama, ["identity@layers.{0,5}.resid_post"], ["ce_kl"],
                 RunConfig(output_dir=tmp_path, progress=False))
    assert not list(tmp_path.rglob("*.json"))


def test_the_same_encoder_twice_at_one_hookpoint_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SaebenchError, match="given twice at layers.1.resid_pre"):
        evaluate(tiny_llama, ["identity", "identity@layers.1.resid_pre"], ["ce_kl"],
                 RunConfig(output_dir=tmp_path, progress=False))
