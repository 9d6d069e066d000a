"""Per-item MSE / L0 / ||x|| and correctness class in the benchmark tasks' details (lambada, cbt), on a tiny trained
Llama: known answers for the identity and zero encoders, and one item recomputed outside the task."""

import pytest
import torch

from saebench.encoders.baselines import IdentityEncoder, ZeroEncoder
from saebench.errors import SaebenchError
from saebench.models import load_model
from saebench.splice import hook_at, sink_mask
from saebench.tasks.base import RunSettings, TaskContext
from saebench.tasks.benchmark import OUTCOMES, ItemScores, checked_items, concat_scores
from saebench.tasks.cbt import CBTTask, load_questions
from saebench.tasks.lm_eval_task import LambadaTask
from tests.unit.tiny_lm import ReluLatentEncoder, build_tiny_model, write_cbt, write_lambada

HOOKPOINT = "layers.0.resid_post"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny"))), "float32", "cpu")


def _ctx(model, limit=None) -> TaskContext:
    return TaskContext.create(model, HOOKPOINT, RunSettings(batch_size=4, limit=limit, progress=False))


def _encoders(model):
    return [IdentityEncoder(model.d_model, HOOKPOINT), ZeroEncoder(model.d_model, HOOKPOINT),
            ReluLatentEncoder(model.d_model, hookpoint=HOOKPOINT)]


def _items(result) -> list[dict]:
    return [r for r in result.details if r["kind"] == "item"]


def _check_known_answers(results) -> None:
    ident, zero, relu = (_items(results[k]) for k in ("identity", "zero", "relu_test"))
    for a, z, r in zip(ident, zero, relu):
        assert a["mse"] == 0.0 and a["delta_logp"] == 0.0 and "l0" not in a  # the identity has no latents
        assert a["outcome"] == ("both_correct" if a["correct_clean"] else "both_wrong")
        assert a["n_positions"] == z["n_positions"] == r["n_positions"] > 0
        # the activation at the hookpoint is read before the splice: the same in every spliced pass
        assert a["norm"] == z["norm"] == r["norm"] > 0
        # zero ablation: MSE is ||x||^2 / d, and the mean of squares is at least the square of the mean
        assert z["mse"] * 32 >= z["norm"] ** 2 * (1 - 1e-9)
        assert r["l0"] > 0 and 0 < r["mse"]
    for row in ident + zero + relu:
        assert row["outcome"] == OUTCOMES[(row["correct_clean"], row["correct"])]


def test_lambada_items_carry_mse_l0_norm_and_class(model, tmp_path):
    results = LambadaTask(data_file=str(write_lambada(tmp_path / "lambada.jsonl", 12))).run(_ctx(model),
                                                                                             _encoders(model))
    _check_known_answers(results)
    zero = _items(results["zero"])
    assert {r["outcome"] for r in zero} & {"only_clean_correct"}  # ablation costs the tiny model answers


@torch.no_grad()
def test_cbt_items_carry_mse_l0_norm_recomputed_outside_the_task(model, tmp_path):
    data = write_cbt(tmp_path / "cbt.txt", 3)
    ctx = _ctx(model)
    results = CBTTask("cn", str(data)).run(ctx, _encoders(model))
    _check_known_answers(results)
    # item 0 by hand: the context's activations at the hookpoint, every position but the sinks
    relu = ReluLatentEncoder(model.d_model, hookpoint=HOOKPOINT)
    ids, _ = CBTTask._tokenize(ctx, load_questions("cn", str(data))[0])
    ids = torch.tensor([ids])
    seen = []
    with hook_at(ctx.hook.hookpoint, lambda x: seen.append(x.clone())):
        model.model(ids)
    x = seen[0][0][~sink_mask(ids, model.bos_id)[0]]
    codes = relu.encode(x, None)
    row = _items(results["relu_test"])[0]
    assert row["n_positions"] == len(x)
    assert row["mse"] == pytest.approx(((x - relu.decode(codes)) ** 2).mean(-1).mean().item(), rel=1e-5)
    assert row["norm"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-5)
    assert row["l0"] == pytest.approx((codes != 0).sum(-1).double().mean().item(), rel=1e-9)


def test_items_parameter_and_limit(model, tmp_path):
    data = str(write_lambada(tmp_path / "lambada.jsonl", 9))
    enc = _encoders(model)[:1]
    assert len(_items(LambadaTask(data_file=data, items="5").run(_ctx(model), enc)["identity"])) == 5
    assert len(_items(LambadaTask(data_file=data, items=5).run(_ctx(model, limit=3), enc)["identity"])) == 3
    cbt = CBTTask("cn", str(write_cbt(tmp_path / "cbt.txt", 4)), items=2)
    assert cbt.config(_ctx(model))["items"] == 2 and cbt.config(_ctx(model, limit=3))["items"] == 3
    for bad in ("many", 0, "-3", 2.5):
        with pytest.raises(SaebenchError, match="cbt parameter items=.*: give a whole number of at least 1"):
            CBTTask("cn", items=bad)


def test_chunks_keep_their_items_site_values_in_order():
    def part(values: list[float]) -> ItemScores:
        n = len(values)
        at_hookpoint = {"n_positions": torch.ones(n, dtype=torch.float64),
                        "mse": torch.tensor(values, dtype=torch.float64)}
        return ItemScores(torch.zeros(n), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                          torch.ones(n, dtype=torch.float64), at_hookpoint=at_hookpoint)

    whole = concat_scores([part([1.0, 2.0]), part([3.0])])
    assert whole.at_hookpoint["mse"].tolist() == [1.0, 2.0, 3.0]
    assert whole.take([2, 0, 1]).at_hookpoint["mse"].tolist() == [3.0, 1.0, 2.0]
    assert checked_items("cbt", None) is None and checked_items("cbt", " 7") == 7
