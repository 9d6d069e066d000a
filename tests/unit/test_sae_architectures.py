"""The default SAE's architectures (sae-lens's own training SAEs), their options, and what ce_kl and leaderboards
show of them: nmse, latent densities, one trade-off frontier per architecture."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from saebench import RunConfig, evaluate
from saebench.cli import main
from saebench.encoders.default_sae import _key_settings, default_sae_config
from saebench.records import config_hash
from tests.unit.test_output_layer import SCRIPT

TODAY = {"expansion": 4, "k": 32, "train_tokens": 200000, "context_len": 128, "epochs": 5, "batch_size": 1024,
         "lr": 0.001, "dead_window": 100, "outlier_factor": 10.0, "seed": 0}
"""The key settings of the default SAE before the batchtopk / gated / jumprelu architectures were added."""
TINY = "train_tokens=2048&context_len=32&batch_size=256&epochs=2&expansion=2&dead_window=5"
"""Training settings small enough for the tiny models (16 optimiser steps)."""


@pytest.mark.parametrize("options, train, digest", [
    ({}, TODAY, "ff9d3024d3776a52"),
    ({"architecture": "standard", "l1_coefficient": "5"}, TODAY | {"architecture": "standard"}, "ad29de95e7f9c359"),
])
def test_cache_keys_of_saes_cached_before_the_new_architectures_are_unchanged(options, train, digest):
    named = {"model": "tiny-llama", "revision": None, "hookpoint": "layers.1.resid_pre"}
    assert config_hash(named | {"train": train}) == digest  # the literal is today's key, hashed as before
    assert config_hash(named | {"train": _key_settings(default_sae_config(options))}) == digest


def test_a_jumprelu_coefficient_names_its_own_cached_sae():
    plain = _key_settings(default_sae_config({"architecture": "jumprelu"}))
    tuned = _key_settings(default_sae_config({"architecture": "jumprelu", "l0_coefficient": "2"}))
    assert plain != tuned and tuned["l0_coefficient"] == 2.0 and "l0_coefficient" not in plain


@pytest.mark.parametrize("options, pattern", [
    ("architecture=standard&k=16", "sae:default option k applies to architecture topk or batchtopk, not standard; "
                                   "standard takes l1_coefficient="),
    ("l1_coefficient=3", "option l1_coefficient applies to architecture standard or gated, not topk"),
    ("architecture=batchtopk&l1_coefficient=3", "applies to architecture standard or gated, not batchtopk"),
    ("architecture=jumprelu&k=8", "option k applies to architecture topk or batchtopk, not jumprelu; "
                                  "jumprelu takes l0_coefficient="),
    ("architecture=gated&l0_coefficient=2", "option l0_coefficient applies to architecture jumprelu, not gated"),
    ("architecture=matryoshka", "architecture='matryoshka': use one of topk, batchtopk, standard, gated, jumprelu"),
    ("architecture=jumprelu&l0_coefficient=0", "l0_coefficient must be positive"),
    ("k=1000", "option k=1000 is more than its 128 latents"),
])
def test_options_that_contradict_the_architecture_are_one_line_exit_2(options, pattern, tiny_llama_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "runs"
    code = main(["run", "--model", str(tiny_llama_dir), "--encoder", f"sae:default?{options}", "--task", "ce_kl",
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    assert not out.exists() or not list(out.rglob("*.json"))


@pytest.mark.parametrize("architecture, sparsity, loaded_as", [
    ("batchtopk", "k=8", "jumprelu"),  # sae-lens saves a BatchTopK SAE as a JumpReLU one with its threshold
    ("gated", "l1_coefficient=1", "gated"),
    ("jumprelu", "l0_coefficient=0.5", "jumprelu"),
    ("standard", "l1_coefficient=1", "standard"),
    ("topk", "k=8", "topk"),
])
def test_each_architecture_trains_loads_and_is_scored_by_ce_kl(architecture, sparsity, loaded_as, tiny_llama,
                                                               tmp_path):
    spec = f"sae:default?architecture={architecture}&{sparsity}&{TINY}"
    config = RunConfig(limit=256, context_len=32, output_dir=tmp_path / "runs", progress=False)
    rec = evaluate(tiny_llama, [spec], ["ce_kl"], config)[0]
    params = rec.encoder["params"]
    assert params["architecture"] == loaded_as and rec.encoder["display"] == {"architecture": architecture}
    assert "display" not in params  # shown, never hashed: cached records and samples keep their keys
    m = rec.metrics
    assert m["l0"] > 0 and 0 < m["nmse"] and m["fve"] == pytest.approx(1 - m["nmse"], abs=1e-12)
    assert rec.stderr["fve"] == rec.stderr["nmse"] and m["ce_loss_recovered"] is not None
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ce_kl" / rec.details_file).read_text().splitlines()]
    freq = [r["firing_frequency"] for r in rows if r["curve"] == "density"]
    assert len(freq) == rec.encoder["d_latent"] == 64
    assert sum(f > 1e-2 for f in freq) == m["dense_1e-2"] and sum(f > 1e-3 for f in freq) == m["dense_1e-3"]
    assert sum(f == 0 for f in freq) / len(freq) == pytest.approx(m["dead_frac"])
    assert sum(freq) == pytest.approx(m["l0"], rel=1e-9)  # mean active latents per token = sum of frequencies


def test_nmse_known_answers(tiny_llama, tmp_path):
    config = RunConfig(limit=256, context_len=32, output_dir=tmp_path / "runs", progress=False)
    recs = {r.encoder["label"]: r for r in evaluate(tiny_llama, ["identity", "zero", "mean"], ["ce_kl"], config)}
    assert recs["identity"].metrics["nmse"] == 0
    assert recs["mean"].metrics["nmse"] == pytest.approx(1.0, abs=1e-5)  # predicting the mean is the denominator
    zero = recs["zero"].metrics  # ||x||^2 = ||x - mean||^2 + ||mean||^2 summed: above 1 by the mean's share
    assert zero["nmse"] > 1 and zero["fve"] == pytest.approx(1 - zero["nmse"], abs=1e-12)
    assert all(r.details_file is None for r in recs.values())  # no latents: no densities
    assert recs["identity"].task["version"] == 2 and ["l0", "nmse"] in recs["identity"].task["tradeoffs"]


def _rec(label, hookpoint, architecture=None):
    display = {"display": {"architecture": architecture}} if architecture else {}
    return SimpleNamespace(encoder={"label": label, "params": {}} | display, hookpoint=hookpoint)


def test_one_frontier_per_hookpoint_and_displayed_values():
    from saebench.plots import frontier_groups, frontier_label

    points = [_rec("sae:default?k=16", "layers.15.resid_post", "topk"),
              _rec("sae:default?architecture=gated", "layers.15.resid_post", "gated"),
              _rec("sae:default?k=64", "layers.15.resid_post", "topk"),
              _rec("sae:default?k=16@5", "layers.5.resid_post", "topk"),
              _rec("ito:sae:default", "layers.15.resid_post")]
    groups = frontier_groups(points)
    assert list(groups) == [("layers.5.resid_post", ("topk",)), ("layers.15.resid_post", ()),
                            ("layers.15.resid_post", ("gated",)), ("layers.15.resid_post", ("topk",))]
    assert groups[("layers.15.resid_post", ("topk",))] == [0, 2]
    assert frontier_label("layers.15.resid_post", ("topk",)) == "frontier topk @ layers.15.resid_post"
    assert frontier_label(None, ()) == "frontier"


def test_density_histogram_and_frontiers_render_from_records_without_torch(tiny_llama, tiny_sae_dir, tmp_path):
    config = RunConfig(limit=256, context_len=32, output_dir=tmp_path / "runs", progress=False)
    rec = evaluate(tiny_llama, [f"sae:{tiny_sae_dir}", "identity"], ["ce_kl"], config)[0]
    assert rec.extra["curves"]["density"]["plot"] == "histogram" and rec.details_file
    out = tmp_path / "lb"
    done = subprocess.run([sys.executable, "-c", SCRIPT, "leaderboard", "--runs", str(tmp_path / "runs"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "heavy modules loaded: []" in done.stdout
    md = (out / "ce_kl.md").read_text()
    assert "](ce_kl-1-density.png)" in md and (out / "ce_kl-1-density.png").stat().st_size > 1000
    assert (out / "ce_kl-1-tradeoff-nmse-vs-l0.png").exists()
    header = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| rank")).split("|")]
    assert {"architecture", "nmse", "dense_1e-3"} <= set(header)
