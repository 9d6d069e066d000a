"""Data-parallel runs (torchrun, gloo on CPU) against one process: bitwise the same records, the batches
really split, a fit done once, a resume after a rank is SIGKILLed, and ranks that disagree stopped.

Every process runs with OMP_NUM_THREADS=1 (torchrun's own default for several ranks), the one-process runs
too: float sums depend on how a matrix product is split over threads, so only runs with the same threads per
process can be compared bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import save_tiny_topk_sae
from tests.unit.tiny_lm import build_tiny_model, write_lambada

ROOT = Path(__file__).resolve().parents[2]
# one pytest-xdist worker runs this module: its fixtures launch every case once, for all its tests
pytestmark = pytest.mark.xdist_group("data_parallel")
HOOK = "layers.1.resid_pre"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    from tests.conftest import make_tiny

    folder = tmp_path_factory.mktemp("parallel")
    loaded = make_tiny("llama", tiny_tokenizer)
    loaded.model.save_pretrained(folder / "tiny")
    tiny_tokenizer.save_pretrained(folder / "tiny")
    return {"tiny": folder / "tiny", "sae": save_tiny_topk_sae(folder / "sae"), "trained": build_tiny_model(folder),
            "lambada": write_lambada(folder / "lambada.jsonl", 24)}


def launch_all(tmp: Path, name: str, ranks: int, commands: list[list[str]], kill: tuple[int, int] = (0, 0)
               ) -> tuple[int, str, list[dict]]:
    """Run the counting child (tests.unit.parallel_child) in 1 process or under torchrun, once for all of
    `commands`; returns the exit code, stderr and, per command, each rank's counts (its exit code included)."""
    log = tmp / f"log-{name}"
    args = [arg for i, command in enumerate(commands) for arg in (["--then"] if i else []) + ["run", *command]]
    child = ["-m", "tests.unit.parallel_child", str(log), str(kill[0]), str(kill[1]), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *launcher, *child], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    by_rank = {int(p.stem[4:]): json.loads(p.read_text()) for p in log.glob("rank*.json")}
    return proc.returncode, proc.stderr, [{r: done[i] for r, done in by_rank.items() if i < len(done)}
                                          for i in range(len(commands))]


def launch(tmp: Path, name: str, ranks: int, args: list[str], kill: tuple[int, int] = (0, 0)) -> tuple[int, str, dict]:
    """One command: the exit code, stderr and each rank's counts."""
    code, err, counts = launch_all(tmp, name, ranks, [args], kill)
    return code, err, counts[0]


def records(folder: Path) -> dict[str, tuple]:
    """Each record's numbers and its details file's rows, by record file name."""
    out = {}
    for path in sorted(folder.glob("*/*.json")):
        rec = json.loads(path.read_text())
        details = path.with_suffix(".details.jsonl")
        out[f"{path.parent.name}/{path.name}"] = (rec["metrics"], rec["stderr"], rec["n"], rec["config_hash"],
                                                 details.read_text() if details.exists() else None)
    return out


def cases(files: dict) -> dict[str, list[str]]:
    sae = f"sae:{files['sae']}"
    tiny = ["--model", str(files["tiny"]), "--hookpoint", HOOK, "--batch-size", "4", "--quiet"]
    return {
        # 22 contexts of 64 tokens: 6 batches, 3 rounds; the mlp family's linear_sae is fitted (once)
        "ce_kl": [*tiny, "--encoder", sae, "--encoder", "mean", "--encoder",
                  "linear_sae?steps=20&train_tokens=2000&batch_size=256", "--task", "ce_kl", "--limit", "1400",
                  "--context-len", "64", "--no-reference-cache"],
        # 7 sequences of 48 tokens: 2 batches, the second rank's last round idle
        "context_sweep": [*tiny, "--encoder", sae, "--task", "context_sweep", "--limit", "7", "--max-len", "48"],
        # 6 positions: 2 batches of llm_sim with the rule simulator (no LLM)
        "latent_recall": [*tiny, "--encoder", f"llm_sim:{sae}?llm=rules", "--task", "latent_recall", "--limit", "6",
                          "--context-len", "32"],
        # 24 items in 3 chunks of 8 (the child's chunk size): rank 0 scores two, rank 1 one
        "lambada": ["--model", str(files["trained"]), "--hookpoint", HOOK, "--batch-size", "4", "--quiet",
                    "--encoder", sae, "--task", "lambada", "--data-file", str(files["lambada"])],
        # 5 sequences in 2-sequence batches: every source's resumed passes and later captures
        "error_propagation": [*tiny, "--encoder", f"{sae}@layers.0.resid_pre", "--encoder",
                              f"{sae}@layers.1.resid_pre", "--task", "error_propagation", "--limit", "5",
                              "--max-len", "24", "--batch-size", "2"],
        # 20 contexts: 5 batches of top and random truncations
        "truncation_curve": [*tiny, "--encoder", sae, "--task", "truncation_curve?fractions=0.25,0.5,1", "--limit",
                             "640", "--context-len", "32"],
        # one encoder at two hookpoints: its single rows and the joint row
        "all_at_once": [*tiny, "--encoder", f"{sae}@layers.{{0,1}}.resid_pre", "--task", "ce_kl", "--all-at-once",
                        "--limit", "640", "--context-len", "32", "--no-reference-cache"],
        # one batch for two ranks: the second has nothing to do and says nothing
        "one_batch": [*tiny, "--encoder", sae, "--task", "ce_kl", "--limit", "128", "--context-len", "64",
                      "--no-reference-cache"],
    }


CASES = ["ce_kl", "context_sweep", "latent_recall", "lambada", "error_propagation", "truncation_curve", "all_at_once",
         "one_batch"]


@pytest.fixture(scope="module")
def one_and_two(files, tmp_path_factory) -> tuple[Path, tuple, tuple]:
    """Every case in one process, then every case on two ranks: two launches for all of them (starting Python,
    torch and the ranks is most of a small case's time)."""
    tmp = tmp_path_factory.mktemp("cases")
    args = cases(files)
    # lambada's clean and zero passes: in the one-process run's own store, then computed into the (cold)
    # reference cache by the two ranks
    one = launch_all(tmp, "one", 1, [[*args[c], *(["--no-reference-cache"] if c == "lambada" else []), "--output",
                                      str(tmp / "one" / c)] for c in CASES])
    two = launch_all(tmp, "two", 2, [[*args[c], "--output", str(tmp / "two" / c)] for c in CASES])
    return tmp, one, two


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_write_bitwise_the_records_of_one_process(one_and_two, case):
    tmp, (_, err_one, counts_one), (_, err_two, counts_two) = one_and_two
    i = CASES.index(case)
    assert counts_one[i][0]["code"] == 0, err_one[-3000:]
    counts = counts_two[i]
    assert sorted(counts) == [0, 1] and all(counts[r]["code"] == 0 for r in (0, 1)), err_two[-3000:]
    one, two = records(tmp / "one" / case), records(tmp / "two" / case)
    assert one and one == two
    assert not list((tmp / "two" / case).glob(".partial/**/*.pt")), "checkpoints are cleared once the records exist"
    if case == "ce_kl":  # 6 batches, one per rank per round; the fit on rank 0 only, rank 1 loads it
        assert [counts[r]["batches"] for r in (0, 1)] == [3, 3]
        assert [counts[r]["fits"] for r in (0, 1)] == [0, 0]  # fitted by the one-process run: cached
    if case == "one_batch":
        assert [counts[r]["batches"] for r in (0, 1)] == [1, 0]


def test_a_fit_runs_once_on_rank_zero(files, tmp_path):
    args = ["--model", str(files["tiny"]), "--hookpoint", HOOK, "--quiet", "--encoder",
            "linear_sae?steps=7&train_tokens=1000", "--task", "ce_kl", "--limit", "256", "--context-len", "64"]
    code, err, counts = launch(tmp_path, "fit", 2, [*args, "--output", str(tmp_path / "out")])
    assert code == 0, err[-3000:]
    assert [counts[r]["fits"] for r in (0, 1)] == [1, 0]


def test_a_killed_rank_resumes_from_the_last_round(files, one_and_two, tmp_path):
    args, one_process = cases(files)["ce_kl"], one_and_two[0] / "one" / "ce_kl"
    assert records(one_process), "the one-process run of the case is there to compare with"
    out = ["--output", str(tmp_path / "two")]
    code, err, counts = launch(tmp_path, "killed", 2, [*args, *out], kill=(1, 2))  # rank 1 dies in round 2
    assert code != 0 and not list((tmp_path / "two").glob("ce_kl/*.json"))
    assert list((tmp_path / "two").glob(".partial/**/*.pt")), "round 1 was checkpointed"
    code, err, counts = launch(tmp_path, "rerun", 2, [*args, *out])
    assert code == 0, err[-3000:]
    # round 1's two batches came from the checkpoint: 4 of the 6 computed again
    assert sum(counts[r]["batches"] for r in (0, 1)) == 4
    assert records(one_process) == records(tmp_path / "two")


def test_ranks_that_disagree_stop_before_anything_is_written(files, tmp_path):
    args = cases(files)["one_batch"]
    code, err, _ = launch(tmp_path, "out", 2, [*args, "--output", str(tmp_path / "out-{rank}")])
    assert code != 0
    assert "saebench: error: the ranks disagree on --output: rank 0 has" in err
    assert not list(tmp_path.glob("out-*/*/*.json"))
    code, err, _ = launch(tmp_path, "seed", 2, [*args, "--output", str(tmp_path / "same"), "--seed", "{rank}"])
    assert code != 0
    assert "the ranks disagree on the run's model, encoders, tasks and settings" in err
    assert not list(tmp_path.glob("same/*/*.json"))
