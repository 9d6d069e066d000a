"""Which lm-eval versions saebench accepts, and the one line it gives for the others."""

import pytest

from saebench import lm_eval_plugin
from saebench.errors import SaebenchError


def test_the_running_lm_eval_is_supported():
    import lm_eval

    assert lm_eval_plugin.lm_eval_version_problem() is None, lm_eval.__file__
    print("lm-eval", lm_eval_plugin._lm_eval_version(), "from", lm_eval.__file__)


@pytest.mark.parametrize("version, ok", [("0.4.12", True), ("0.4.13", True), ("0.4.14", True), ("0.4.11", False),
                                         ("0.4.9.2", False), ("0.5.0", False), ("(unknown version)", False)])
def test_versions_outside_the_range_get_one_line(monkeypatch, version, ok):
    monkeypatch.setattr(lm_eval_plugin, "_lm_eval_version", lambda: version)
    problem = lm_eval_plugin.lm_eval_version_problem()
    assert (problem is None) == ok
    if not ok:
        assert "saebench supports lm-eval >=0.4.12,<0.5 (tested with 0.4.12 and 0.4.13)" in problem
        assert "\n" not in problem
        from saebench.tasks.lm_eval_task import LambadaTask

        with pytest.raises(SaebenchError, match="supports lm-eval"):
            LambadaTask()
