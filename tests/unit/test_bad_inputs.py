"""Bad inputs that used to escape as a traceback, a Python-internals message or a silent default: each is one
line on stderr, exit code 2 and no record."""

import pytest

from saebench.errors import SaebenchError
from tests.unit.test_cli_errors import assert_clean_failure, run_cli


def _run(model_dir, argv, capsys, out):
    return run_cli(["run", "--model", str(model_dir), "--hookpoint", "layers.1.resid_pre", "--encoder", "identity",
                    *argv], capsys, out)


@pytest.mark.parametrize("content, pattern", [
    ("", "is empty; a JSON-lines file holds one JSON object per line"),
    ("\n\n", "is empty; a JSON-lines file holds one JSON object per line"),
    ('{"text": "one two three"}\n{"txt": "four five"}\n', "line 2 has no 'text' field (it has 'txt'); every line "
                                                          "needs 'text'"),
])
def test_a_lambada_data_file_without_rows_or_text(content, pattern, tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "lambada.jsonl"
    data.write_text(content)
    out = tmp_path / "runs"
    code, err = _run(tiny_llama_dir, ["--task", "lambada", "--data-file", str(data)], capsys, out)
    assert_clean_failure(code, err, out, pattern)


def test_max_len_zero_is_an_error_not_the_default(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = _run(tiny_llama_dir, ["--task", "context_sweep", "--max-len", "0", "--limit", "2"], capsys, out)
    assert_clean_failure(code, err, out, "--max-len must be at least 2, not 0")


@pytest.mark.parametrize("task, pattern", [
    ("ce_kl?foo=1", "task 'ce_kl' takes no parameter 'foo'; its parameters are tokens, context_len, all_at_once"),
    ("ce_kl?token=5", "takes no parameter 'token' (did you mean 'tokens'?)"),
])
def test_an_unknown_task_parameter_names_the_accepted_ones(task, pattern, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = _run(tiny_llama_dir, ["--task", task], capsys, out)
    assert_clean_failure(code, err, out, pattern)
    assert "__init__" not in err


def test_a_failed_cbt_download_keeps_the_reason(monkeypatch):
    import datasets

    from saebench.tasks.cbt import load_questions

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cbt' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SaebenchError, match=r"cbt/CN \(ConnectionError: Couldn't reach 'cbt' on the Hub "
                                            r"\(OfflineModeIsEnabled\)\); pass --data-file"):
        load_questions("cn", None)
