"""`lm_eval --model saebench` launched data-parallel (torchrun, 2 CPU ranks on gloo) gives the numbers of one
process, and each rank scores its half of the requests."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_benchmark_tasks import HOOKPOINT, _local_lambada_yaml
from tests.unit.tiny_lm import build_tiny_model, successor, write_lambada

N_DOCS = 16

DRIVER = '''"""lm-eval's CLI (as `python -m lm_eval`), with SaebenchLM counting the loglikelihood requests it scores."""
import os, runpy, sys
from pathlib import Path
from saebench.lm_eval_model import SaebenchLM

log = Path(sys.argv[1]) / f"rank{os.environ.get('RANK', '0')}.txt"
scored = 0
score = SaebenchLM._loglikelihood_tokens

def counting(self, requests, *args, **kwargs):
    global scored
    scored += len(requests)
    log.write_text(str(scored))
    return score(self, requests, *args, **kwargs)

SaebenchLM._loglikelihood_tokens = counting
sys.argv = ["lm_eval", *sys.argv[2:]]
runpy.run_module("lm_eval", run_name="__main__")
'''


def _half_wrong(path: Path) -> Path:
    """Lambada items whose odd documents end in a wrong word (the right one's successor, never the right one):
    the trained model gets the even ones right and the odd ones wrong, so acc is 0.5 only if both ranks'
    metrics (rank 0 has the even documents, rank 1 the odd) reach the result."""
    lines = path.read_text().splitlines()
    for i in range(1, len(lines), 2):
        words = json.loads(lines[i])["text"].split(" ")
        lines[i] = json.dumps({"text": " ".join([*words[:-1], successor(words[-1])])})
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _lm_eval(launcher: list[str], tmp_path: Path, model: Path, name: str) -> dict:
    """Run lm-eval's CLI on lambada_local under `launcher`; its results, samples and per-rank counts."""
    counts, out = tmp_path / f"{name}-counts", tmp_path / f"{name}-out"
    counts.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        # one thread per process, so the two runs' float sums are the same
                        "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [*launcher, str(driver), str(counts), "run", "--model", "saebench", "--model_args",
         f"pretrained={model},encoder=identity,hookpoint={HOOKPOINT},dtype=float32",
         "--tasks", "lambada_local", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
         # batch size 1: each request is scored alone, so neither run's batching touches a logit
         "--batch_size", "1", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_lambada_local_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {"results": json.loads(results.read_text())["results"]["lambada_local"],
            "logp": {r["doc_id"]: r["resps"][0][0][0] for r in rows},
            "ranks": {p.stem: int(p.read_text()) for p in sorted(counts.glob("rank*.txt"))},
            "stderr": proc.stderr}


def test_torchrun_splits_requests_over_ranks_with_the_numbers_of_one_process(tmp_path):
    model = build_tiny_model(tmp_path, steps=30)
    _local_lambada_yaml(tmp_path / "tasks", _half_wrong(write_lambada(tmp_path / "lambada.jsonl", N_DOCS)))
    start = time.perf_counter()
    # --standalone: a local rendezvous on a free port (MASTER_PORT), so parallel test runs do not collide
    two = _lm_eval([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                   tmp_path, model, "two")
    one = _lm_eval([sys.executable], tmp_path, model, "one")
    print(f"1 vs 2 processes: {one['results']} vs {two['results']}; per rank {two['ranks']}; "
          f"{time.perf_counter() - start:.1f} s")

    assert one["ranks"] == {"rank0": N_DOCS}
    assert two["ranks"] == {"rank0": N_DOCS // 2, "rank1": N_DOCS // 2}
    assert "requests are split over 2 ranks" in two["stderr"]
    assert two["logp"] == one["logp"] and len(one["logp"]) == N_DOCS  # every document, bit for bit
    assert two["results"]["acc,none"] == one["results"]["acc,none"] == 0.5
    # rank 1's documents are appended to rank 0's before the mean, so the sum may differ in its last bit
    assert two["results"]["perplexity,none"] == pytest.approx(one["results"]["perplexity,none"], rel=1e-12)
