"""lambada / cbt / lm_eval:<task> on a tiny trained Llama and locally written data files."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from saebench.encoders.baselines import IdentityEncoder, ZeroEncoder
from saebench.errors import SaebenchError
from saebench.models import load_model
from saebench.runner import resolve_task
from saebench.tasks.base import RunSettings, TaskContext
from saebench.tasks.benchmark import feature_scores, paired_bootstrap_se, top_features
from saebench.tasks.cbt import CBTTask, detokenize, parse_cbt
from saebench.tasks.lm_eval_task import LambadaFirstTokenTask, LambadaTask, LMEvalTask
from tests.unit.tiny_lm import ReluLatentEncoder, build_tiny_model, write_cbt, write_lambada

HOOKPOINT = "layers.0.resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    path = build_tiny_model(folder)
    return {"path": path, "model": load_model(str(path), "float32", "cpu"), "dir": folder}


def _ctx(model, limit=None) -> TaskContext:
    return TaskContext.create(model, HOOKPOINT, RunSettings(batch_size=4, limit=limit, progress=False))


def _encoders(model):
    return [IdentityEncoder(model.d_model, HOOKPOINT), ZeroEncoder(model.d_model, HOOKPOINT),
            ReluLatentEncoder(model.d_model, hookpoint=HOOKPOINT)]


def test_feature_scores_known_answer():
    # latent 3 active on items 0, 1, 2 (deltas +1, -2, 0): score 2 - 1 = 1, mean -1/3
    pairs = torch.tensor([[0, 3], [1, 3], [2, 3], [1, 5]])
    delta = torch.tensor([1.0, -2.0, 0.0])
    rows = {r["feature"]: r for r in feature_scores(pairs, delta, d_latent=8)}
    assert set(rows) == {3, 5}
    assert rows[3]["score"] == 1 and rows[3]["n_prompts"] == 3
    assert rows[3]["mean_delta_logp"] == pytest.approx(-1 / 3)
    assert rows[5]["score"] == -1 and rows[5]["mean_delta_logp"] == pytest.approx(-2.0)
    # controlled: latent 3 active mean -1/3, inactive: nothing (3 items, all active) -> None
    assert rows[3]["controlled_delta_logp"] is None
    # latent 5 active on item 1 (-2) vs inactive items 0, 2 (mean 0.5): -2.5, no SE with one active prompt
    assert rows[5]["controlled_delta_logp"] == pytest.approx(-2.5) and rows[5]["controlled_se"] is None
    top = top_features(list(rows.values()), k=1, min_prompts=1)
    assert top["most_harmful"] == [] and top["ranked_by"] == "controlled_delta_logp"  # no score or no SE: unranked


def test_ranking_is_by_controlled_score_among_latents_with_enough_prompts():
    def row(f, controlled, n):
        return {"feature": f, "controlled_delta_logp": controlled, "controlled_se": 0.1, "score": -n,
                "n_prompts": n, "mean_delta_logp": controlled}

    rows = [row(1, -3.0, 1), row(2, -1.0, 30), row(3, -0.5, 500), row(4, 0.7, 25), row(5, 2.0, 19)]
    top = top_features(rows, k=2, min_prompts=20)
    assert [r["feature"] for r in top["most_harmful"]] == [2, 3]  # latent 1 (one prompt) is not ranked
    assert [r["feature"] for r in top["most_helpful"]] == [4, 3]  # latent 5 (19 prompts) is not ranked
    assert top["min_prompts"] == 20


def test_controlled_score_is_welch_difference_of_means():
    import numpy as np
    from scipy import stats

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(40, generator=gen, dtype=torch.float64)
    active = [0, 3, 4, 9, 10, 11, 20, 33]
    pairs = torch.tensor([[i, 7] for i in active])
    [row] = feature_scores(pairs, delta, d_latent=8)
    a = delta[active].numpy()
    b = np.delete(delta.numpy(), active)
    t = stats.ttest_ind(a, b, equal_var=False)
    assert row["controlled_delta_logp"] == pytest.approx(a.mean() - b.mean())
    assert row["controlled_delta_logp"] / row["controlled_se"] == pytest.approx(t.statistic)


def test_paired_bootstrap_matches_standard_error_of_paired_difference():
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(2000, generator=gen) < 0.5).double()
    b = torch.where(torch.rand(2000, generator=gen) < 0.8, a, 1 - a)
    analytic = (a - b).std() / len(a) ** 0.5
    assert paired_bootstrap_se(a, b, seed=0) == pytest.approx(analytic.item(), rel=0.1)


def test_parse_cbt_and_bad_input(tmp_path):
    questions = parse_cbt(write_cbt(tmp_path / "cbt.txt", 3).read_text())
    assert len(questions) == 3 and len(questions[0].context) == 20 and len(questions[0].candidates) == 10
    assert questions[0].answer in questions[0].candidates and "XXXXX" in questions[0].query
    with pytest.raises(SaebenchError, match="CBTest format"):
        parse_cbt("1 a sentence\n21 no tabs here\n")
    with pytest.raises(SaebenchError, match="does not exist"):
        CBTTask(data_file=str(tmp_path / "missing.txt")).run(None, [])
    with pytest.raises(SaebenchError, match="subset"):
        CBTTask(subset="v")
    # punctuation and contractions re-attach; quote marks are normalised but keep their spaces
    assert detokenize("` Yes , go , ' he said ; `` do n't ! ''") == "' Yes, go, ' he said; \" don't! \""


def test_resolve_task_passes_the_suffix_after_a_colon():
    task = resolve_task("lm_eval:hellaswag")
    assert isinstance(task, LMEvalTask) and task.spec.name == "lm_eval:hellaswag"
    assert resolve_task("ce_kl").spec.name == "ce_kl"
    assert resolve_task("cbt_ne").subset == "ne"
    with pytest.raises(SaebenchError, match="unknown task"):
        resolve_task("nonsense:x")


def test_lambada_identity_equals_clean_and_zero_hurts(tiny, tmp_path):
    model = tiny["model"]
    data = write_lambada(tmp_path / "lambada.jsonl", 24)
    task = LambadaTask(data_file=str(data))
    results = task.run(_ctx(model), _encoders(model))
    ident, zero, relu = results["identity"], results["zero"], results["relu_test"]
    assert ident.metrics["acc_clean"] > 0.5  # the tiny model learned its bigram language
    assert ident.metrics["acc"] == ident.metrics["acc_clean"] and ident.metrics["delta_acc"] == 0
    assert ident.metrics["delta_logp"] == 0 and ident.metrics["perplexity"] == ident.metrics["perplexity_clean"]
    assert ident.metrics["ce_prompt"] == ident.metrics["ce_prompt_clean"]
    assert zero.metrics["acc"] == zero.metrics["acc_zero"] < ident.metrics["acc_clean"]
    assert zero.metrics["delta_logp"] < 0 and zero.stderr["delta_acc"] > 0
    assert ident.n["acc"] == 24
    items = [r for r in relu.details if r["kind"] == "item"]
    features = [r for r in relu.details if r["kind"] == "feature"]
    assert len(items) == 24 and features and "most_helpful" in relu.extra["features"]
    assert all(abs(r["score"]) <= r["n_prompts"] <= 24 for r in features)
    first = LambadaFirstTokenTask(data_file=str(data)).run(_ctx(model), _encoders(model)[:1])["identity"]
    # one-word targets: the first token is the whole answer, so both protocols agree here
    assert first.metrics["acc_clean"] == ident.metrics["acc_clean"]


def test_lambada_clean_matches_lm_eval_hf_model(tiny, tmp_path):
    """saebench's clean pass and lm-eval's own `hf` model give the same per-item answers."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny["model"]
    data = write_lambada(tmp_path / "lambada.jsonl", 16)
    ours = LambadaTask(data_file=str(data)).run(_ctx(model), _encoders(model)[:1])["identity"]
    _local_lambada_yaml(tmp_path / "tasks", data)
    hf = HFLM(pretrained=str(tiny["path"]), batch_size=4, device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(model=hf, tasks=["lambada_local"], task_manager=TaskManager(
        include_path=str(tmp_path / "tasks")))
    theirs = out["results"]["lambada_local"]
    assert theirs["acc,none"] == ours.metrics["acc_clean"]
    assert theirs["perplexity,none"] == pytest.approx(ours.metrics["perplexity_clean"], rel=1e-6)


def test_checkpointed_lambada_runs_lm_eval_s_own_batches(tiny, tmp_path, monkeypatch):
    """Chunked for checkpoints and run in lm-eval's length order, lambada still gives each item the
    log-likelihood lm-eval's `hf` model gives it, bit for bit. (On this tiny model the batch shape does
    not change a logit, so this checks the requests and the reordering; that the batches are lm-eval's
    own matters in bf16 on real models, where it does.)"""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from saebench.tasks import benchmark

    monkeypatch.setattr(benchmark, "CHECKPOINT_ITEMS", 4)
    model = tiny["model"]
    data = write_lambada(tmp_path / "lambada.jsonl", 22)
    ours = LambadaTask(data_file=str(data)).run(_ctx(model), _encoders(model)[:1])["identity"]
    _local_lambada_yaml(tmp_path / "tasks", data)
    hf = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=4, device="cpu")
    out = lm_eval.simple_evaluate(model=hf, tasks=["lambada_local"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    theirs = {s["doc_id"]: s["resps"][0][0][0] for s in out["samples"]["lambada_local"]}
    rows = [r for r in ours.details if r["kind"] == "item"]
    assert len(rows) == len(theirs) == 22
    assert all(r["logp_clean"] == theirs[r["doc_id"]] for r in rows)


def _local_lambada_yaml(folder: Path, data: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lambada_local.yaml").write_text(
        "task: lambada_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_multiple_choice_task_from_include_path(tiny, tmp_path):
    rows = [{"prefix": "w0", "choices": ["w3", "w5", "w7"], "label": 0},
            {"prefix": "w1", "choices": ["w2", "w10", "w4"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{prefix}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    task = resolve_task("lm_eval:tiny_mc", {"include_path": str(tmp_path / "tasks")})
    res = task.run(_ctx(tiny["model"]), _encoders(tiny["model"])[:1])["identity"]
    assert res.metrics["acc_clean"] == 1.0 and res.metrics["delta_acc"] == 0  # w0 -> w3, w1 -> w10
    assert res.n["acc"] == 2


def test_cbt_identity_equals_clean(tiny, tmp_path):
    model = tiny["model"]
    data = write_cbt(tmp_path / "cbt.txt", 6)
    results = CBTTask("cn", str(data)).run(_ctx(model), _encoders(model))
    ident, zero, relu = results["identity"], results["zero"], results["relu_test"]
    assert ident.metrics["acc_clean"] > 0.5
    assert ident.metrics["acc"] == ident.metrics["acc_clean"] and ident.metrics["delta_logp"] == 0
    assert zero.metrics["acc"] == ident.metrics["acc_zero"]
    assert ident.n["acc"] == 6 and len(ident.details) == 6
    assert any(r["kind"] == "feature" for r in relu.details)


def test_lm_eval_cli_finds_the_saebench_model(tiny, tmp_path):
    """lm-eval's own CLI runs `--model saebench` (registered by the installed .pth hook)."""
    data = write_lambada(tmp_path / "lambada.jsonl", 8)
    _local_lambada_yaml(tmp_path / "tasks", data)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "saebench", "--model_args",
         f"pretrained={tiny['path']},encoder=identity,hookpoint={HOOKPOINT},dtype=float32",
         "--tasks", "lambada_local", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lambada_local" in out.stdout and "acc" in out.stdout


def test_a_gold_answer_outside_the_choices_is_an_error_not_choice_0():
    from types import SimpleNamespace

    from saebench.errors import SaebenchError
    from saebench.tasks.lm_eval_task import LMEvalTask

    task = SimpleNamespace(OUTPUT_TYPE="multiple_choice", config=SimpleNamespace(task="toy"),
                           doc_to_target=lambda doc: doc["gold"], doc_to_choice=lambda doc: ["a", "b", "c"])
    assert LMEvalTask._gold_index(task, {"gold": 2}, 3, 7) == 2
    assert LMEvalTask._gold_index(task, {"gold": "b"}, 3, 7) == 1
    with pytest.raises(SaebenchError, match="document 7: its answer index 5 is outside its 3 choices"):
        LMEvalTask._gold_index(task, {"gold": 5}, 3, 7)
    with pytest.raises(SaebenchError, match="its answer 'z' is not one of its choices"):
        LMEvalTask._gold_index(task, {"gold": "z"}, 3, 7)


BREAK_THE_HOOK = (
    "finder = next(f for f in sys.meta_path if getattr(f, 'saebench_lm_eval', False))  # from the .pth\n"
    "def broken():\n"
    "    raise RuntimeError('registry moved')\n"
    "type(finder).find_spec.__globals__['register'] = broken\n")


def test_a_failing_lm_eval_hook_leaves_lm_eval_working_for_other_models(tiny, tmp_path):
    """Force the start-up hook's registration to fail: lm-eval's own `--model hf` still runs."""
    data = write_lambada(tmp_path / "lambada.jsonl", 8)
    _local_lambada_yaml(tmp_path / "tasks", data)
    script = tmp_path / "run.py"
    script.write_text(
        "import runpy, sys\n"
        + BREAK_THE_HOOK
        + f"sys.argv = ['lm_eval', 'run', '--model', 'hf', '--model_args', 'pretrained={tiny['path']},dtype=float32',"
        f" '--tasks', 'lambada_local', '--include_path', {str(tmp_path / 'tasks')!r}, '--device', 'cpu',"
        " '--batch_size', '4']\n"
        + "runpy.run_module('lm_eval', run_name='__main__')\n")
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lambada_local" in out.stdout and "acc" in out.stdout
    assert "could not register" not in out.stderr  # --model saebench was not asked for: no noise


def test_a_failing_lm_eval_hook_says_so_when_saebench_is_asked_for(tmp_path):
    script = tmp_path / "ask.py"
    script.write_text(
        "import sys\n"
        + BREAK_THE_HOOK
        + "sys.argv = ['lm_eval', 'run', '--model', 'saebench']\nimport lm_eval.models\nprint('imported')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]
    assert "could not register `--model saebench` with lm-eval" in out.stderr
    assert "RuntimeError: registry moved" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _child_args(tiny, task, data, output, kill_after=0, release: Path | None = None) -> dict:
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {"args": [sys.executable, "-m", "tests.unit.resume_child", str(tiny["path"]), task, str(data),
                     str(output), str(kill_after), *([str(release)] if release else [])],
            "env": env, "cwd": Path(__file__).resolve().parents[2], "text": True}


@pytest.fixture
def popen():
    """subprocess.Popen whose children are killed at teardown if still running: a failed test (a timeout,
    an assertion before the release file exists) leaves no run behind holding for 600 s."""
    procs: list[subprocess.Popen] = []

    def start(**kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(**kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _child(tiny, task, data, output, kill_after=0):
    return subprocess.run(**_child_args(tiny, task, data, output, kill_after), capture_output=True, timeout=600)


def _numbers(output: Path) -> list[float]:
    """Every metric, standard error and per-item detail value of the records under `output`, in order."""
    out = []
    for path in sorted(output.rglob("*.json")):
        rec = json.loads(path.read_text())
        for part in ("metrics", "stderr"):
            out += [v for _, v in sorted(rec[part].items()) if isinstance(v, float)]
        details = path.with_suffix(".details.jsonl")
        if details.exists():
            for line in details.read_text().splitlines():
                out += [v for _, v in sorted(json.loads(line).items()) if isinstance(v, float)]
    return out


@pytest.mark.parametrize("task,kill_after", [("lambada", 9), ("cbt_cn", 5), ("ce_kl", 7)])
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tiny, tmp_path, task, kill_after):
    data = (write_lambada(tmp_path / "lambada.jsonl", 24) if task == "lambada" else
            write_cbt(tmp_path / "cbt.txt", 12) if task == "cbt_cn" else None)
    killed = _child(tiny, task, data, tmp_path / "a", kill_after)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not list((tmp_path / "a").rglob("*.json"))  # no record, half-written or otherwise
    resumed = _child(tiny, task, data, tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = _child(tiny, task, data, tmp_path / "b")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    n_resumed, n_fresh = (int(p.stdout.split(":")[-1]) for p in (resumed, fresh))
    assert n_resumed == n_fresh - kill_after  # what was checkpointed was not recomputed
    assert not list((tmp_path / "a").rglob("*.pt"))  # checkpoints cleared once the records exist
    a, b = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert len(a) == len(b) > 20
    assert max(abs(x - y) for x, y in zip(a, b)) == 0.0


def test_two_runs_writing_into_one_output_folder_at_once(tiny, tmp_path, popen):
    """A second run of the same records waits for the first and reuses them; another task runs alongside."""
    lambada, cbt = write_lambada(tmp_path / "lambada.jsonl", 24), write_cbt(tmp_path / "cbt.txt", 8)
    out = tmp_path / "shared"
    release = tmp_path / "release"  # the first run holds after its first checkpoint until this exists
    first = popen(**_child_args(tiny, "lambada", lambada, out, release=release), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.rglob("*.pieces/*.pt")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    same = popen(**_child_args(tiny, "lambada", lambada, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    other = popen(**_child_args(tiny, "cbt_cn", cbt, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said = []  # the second run's stderr, read as it comes; the first is released once it says it waits
    reader = threading.Thread(target=lambda: said.extend(iter(same.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("waiting for it to finish" in line for line in said) and time.monotonic() < deadline \
            and same.poll() is None:
        time.sleep(0.05)
    release.touch()
    outputs = [p.communicate(timeout=600) for p in (first, other)]
    same_out = same.stdout.read()
    same.wait(timeout=600)
    reader.join(timeout=60)
    outputs.insert(1, (same_out, "".join(said)))
    assert [p.returncode for p in (first, same, other)] == [0, 0, 0], [o[1][-2000:] for o in outputs]
    assert "waiting for it to finish" in outputs[1][1]
    assert outputs[1][0].strip() == "checkpoints written: 0"  # it reused the first run's records
    assert sorted(p.parent.name for p in out.rglob("*.json")) == ["cbt", "lambada"]
    for task, data in (("lambada", lambada), ("cbt_cn", cbt)):
        assert _child(tiny, task, data, tmp_path / task).returncode == 0
    assert _numbers(out) == _numbers(tmp_path / "cbt_cn") + _numbers(tmp_path / "lambada")


def test_batching_plan_cuts_chunks_at_whole_lm_eval_batches_of_unique_rows():
    """lm-eval runs identical inputs once, so chunks count unique rows and never split duplicates."""
    from types import SimpleNamespace

    from saebench.tasks.lm_eval_task import _batching_plan

    lengths = [9, 9, 8, 8, 7, 7, 6, 5, 4, 3, 2]
    toks = [list(range(n)) for n in lengths]
    toks[1] = list(toks[0])  # documents 0 and 1 are the same request: one row
    instances = [SimpleNamespace(doc_id=d) for d in range(len(toks))]
    lm = SimpleNamespace(encoded_requests=lambda insts: [(("", ""), t[:-1], t[-1:]) for t in toks])
    for k in range(2, 6):  # distinct requests of equal length: ties are broken by their tokens
        toks[k] = [k] * lengths[k]
    order, chunks = _batching_plan(lm, instances, list(range(len(toks))), batch_size=2, chunk_rows=4)
    assert [len(toks[d]) for d in order] == sorted(lengths, reverse=True)  # longest first
    assert order.index(1) == order.index(0) + 1
    assert [(c.start, c.stop) for c in chunks] == [(0, 5), (5, 9), (9, 11)]  # 4 rows, 4 rows, the rest


@pytest.mark.parametrize("task_name", ["lambada", "cbt"])
def test_the_clean_and_zero_passes_come_from_the_reference_cache_with_the_same_numbers(tiny, tmp_path, monkeypatch,
                                                                                         task_name):
    monkeypatch.setenv("SAEBENCH_CACHE", str(tmp_path / "cache"))
    model = load_model(str(tiny["path"]), "float32", "cpu")  # its own copy: this test edits its weights

    def make_task(seed: int):
        if task_name == "lambada":
            return LambadaTask(data_file=str(write_lambada(tmp_path / f"lambada{seed}.jsonl", 12, seed)))
        return CBTTask("cn", str(write_cbt(tmp_path / f"cbt{seed}.txt", 6, seed)))

    task = make_task(1)
    calls = [0]
    model.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def run(hookpoint=HOOKPOINT, cache=True, scored=task):
        calls[0] = 0
        ctx = TaskContext.create(model, hookpoint, RunSettings(batch_size=4, progress=False, cache_references=cache))
        result = scored.run(ctx, [ReluLatentEncoder(model.d_model, hookpoint=hookpoint)])["relu_test"]
        return result, calls[0]

    uncached, three_passes = run(cache=False)
    assert not (tmp_path / "cache" / "reference").exists()
    cold, cold_calls = run()
    warm, warm_calls = run()
    one_pass = three_passes // 3
    # + one probe of the model's state
    assert cold_calls == three_passes + 1 and warm_calls == one_pass + 1
    for got in (cold, warm):
        assert got.metrics == uncached.metrics and got.stderr == uncached.stderr and got.details == uncached.details
    # another hookpoint splices elsewhere: its zero pass is its own, the clean pass is the same
    _, other_calls = run("layers.1.resid_post")
    assert other_calls == 2 * one_pass + 1
    # a chunk missing from an entry (a pass interrupted before it) is computed again, and only that chunk
    keys = {e: json.loads((e / "meta.json").read_text())["key"] for e in (tmp_path / "cache" / "reference").iterdir()}
    assert sorted((k["pass"], k.get("hookpoint", "")) for k in keys.values()) == [
        ("clean", ""), ("zero", HOOKPOINT), ("zero", "layers.1.resid_post")]
    (clean,) = [e for e, k in keys.items() if k["pass"] == "clean"]
    (piece,) = (clean / "pass.pieces").glob("*.pt")  # 12 items (6 for cbt): one chunk
    piece.unlink()
    again, again_calls = run()
    assert again_calls == 2 * one_pass + 1 and again.metrics == uncached.metrics and piece.exists()
    # other items under the same task configuration (as an edited lm-eval template or another revision of a hub
    # dataset would be): their own entries
    monkeypatch.setattr(type(task), "config", lambda self, ctx: {"the": "same configuration"})
    other = make_task(2)
    run(scored=task)
    other_items, other_items_calls = run(scored=other)
    assert other_items_calls == three_passes + 1 and other_items.metrics == run(cache=False, scored=other)[0].metrics
    monkeypatch.undo()
    monkeypatch.setenv("SAEBENCH_CACHE", str(tmp_path / "cache"))
    # the same model id with other weights: entries of its own (its probe differs), the numbers are its own
    with torch.no_grad():
        next(model.model.parameters()).mul_(1.5)
    changed, changed_calls = run()
    assert changed_calls == three_passes + 1 and changed.metrics == run(cache=False)[0].metrics != uncached.metrics
