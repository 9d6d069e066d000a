"""Presets that follow a source's protocol: they refuse options that contradict it, in one line."""

import pytest

from saebench.errors import SaebenchError
from saebench.presets import load_presets
from saebench.tasks import names

FAKE = {"recall_src": {"task": "latent_recall", "source": "000", "protocol": ["candidates", "context_len"],
                       "params": {"candidates": 1000, "positions": 100}},
        "free": {"task": "ce_kl", "params": {"tokens": 10}}}


@pytest.fixture
def fake_presets(monkeypatch):
    monkeypatch.setattr(names, "load_presets", lambda kind, name: FAKE)


def test_options_that_keep_the_protocol_pass(fake_presets):
    names.check_protocol("recall_src", {}, {"limit": 20, "context_len": None})  # sample size is not protocol
    names.check_protocol("recall_src?candidates=1000&positions=7", {}, {})
    names.check_protocol("free?tokens=5", {}, {"context_len": 64})
    FAKE["recall_src"]["params"]["context_len"] = 32
    names.check_protocol("recall_src", {}, {"context_len": 32})  # the preset's own value
    del FAKE["recall_src"]["params"]["context_len"]


@pytest.mark.parametrize("name, overrides, settings, said", [
    ("recall_src?candidates=200", {}, {}, "candidates=200 contradicts it: run task 'latent_recall'"),
    ("recall_src", {"candidates": 50}, {}, "with candidates=1000; candidates=50"),
    ("recall_src", {}, {"context_len": 64}, "--context-len 64 contradicts it"),
    ("recall_src?context_len=16", {}, {}, "context_len=16 contradicts it"),
])
def test_a_contradicting_option_is_one_line_naming_it(fake_presets, name, overrides, settings, said):
    with pytest.raises(SaebenchError) as err:
        names.check_protocol(name, overrides, settings)
    assert said in str(err.value) and "follows the protocol of source 000" in str(err.value)
    assert "\n" not in str(err.value)


def test_every_shipped_protocol_names_parameters_its_task_takes():
    for name, preset in load_presets("tasks", "*").items():
        for key in preset.get("protocol") or []:
            assert key in names.RUN_SETTINGS or key in names.accepted_params(name), (name, key)
            assert preset.get("source"), name


@pytest.mark.parametrize("argv, said", [
    (["--task", "lambada_anders_bloom?items=10"], "'lambada_anders_bloom' follows the protocol of source 004"),
    (["--task", "lambada_anders_bloom", "--limit", "10"], "--limit 10 contradicts it: run task 'lambada'"),
    (["--task", "latent_recall_eleuther?candidates=200"], "candidates=200 contradicts it: run task 'latent_recall'"),
    (["--task", "truncation_curve_eleuther", "--context-len", "128"], "--context-len 128 contradicts it"),
])
def test_the_cli_refuses_a_contradicting_option_before_any_work(argv, said, tmp_path, capsys):
    from saebench.cli import main

    out = tmp_path / "runs"
    code = main(["run", "--model", str(tmp_path / "no-model-needed"), "--encoder", "identity", *argv,
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and said in err, err
    assert not out.exists() or not list(out.rglob("*.json"))
