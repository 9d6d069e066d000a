"""SIGKILL a real `saebench run` about half way, rerun it, and compare with an uninterrupted run.

For one task on the embedded model:

  1. run the command uninterrupted into a fresh output folder (A), timing it;
  2. run it again into folder B and send SIGKILL at half of A's wall time;
  3. rerun the same command into B: it resumes from B's checkpoints;
  4. print whether B held checkpoints at the kill, how long the rerun took against A, and the
     maximum absolute difference between A's and B's records: every metric, every standard
     error, and every number of every per-item / per-latent details row.

Reference passes are not cached (`--no-reference-cache`) so A and B compute the same thing;
`ce_kl` checkpoints every 5 seconds here (its default is 60) so that half way has one.

Usage:
    python benchmarks/resume_check.py --task lambada --limit 1024 --data-file ../shared/data/lambada_test.jsonl
    python benchmarks/resume_check.py --task ce_kl --limit 51200
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from saebench.cli import main
from saebench.tasks import ce_kl
ce_kl.CHECKPOINT_SECONDS = 5.0
sys.exit(main(sys.argv[1:]))
"""


def numbers(folder: Path) -> dict[str, float]:
    """Every float in the records under `folder` and their details files, keyed by where it sits."""
    out = {}
    for path in sorted(folder.rglob("*.json")):
        rec = json.loads(path.read_text())
        for part in ("metrics", "stderr"):
            out |= {f"{path.name}:{part}.{k}": v for k, v in rec[part].items() if isinstance(v, float)}
        details = path.with_suffix(".details.jsonl")
        if details.exists():
            for i, line in enumerate(details.read_text().splitlines()):
                out |= {f"{details.name}:{i}.{k}": v for k, v in json.loads(line).items() if isinstance(v, float)}
    return out


def run(argv: list[str], output: Path, kill_after: float | None = None) -> tuple[float, int]:
    cmd = [sys.executable, "-c", CHILD, "run", *argv, "--output", str(output), "--no-reference-cache", "--quiet"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.exit(f"saebench run failed ({proc.returncode}): {err[-2000:]}")
    return time.monotonic() - start, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--data-file")
    p.add_argument("--encoder", action="append", default=None, help="default: sae:default")
    args = p.parse_args()
    argv = ["--model", "smollm2-135m", "--task", args.task, "--limit", str(args.limit)]
    for enc in args.encoder or ["sae:default"]:
        argv += ["--encoder", enc]
    if args.data_file:
        argv += ["--data-file", args.data_file]
    with tempfile.TemporaryDirectory(prefix="resume_check-") as tmp:
        a, b = Path(tmp) / "uninterrupted", Path(tmp) / "killed"
        full, _ = run(argv, a)
        killed_at, code = run(argv, b, kill_after=full / 2)
        held = sorted(str(f.relative_to(b)) for f in (b / ".partial").rglob("*.pt")) if (b / ".partial").exists() else []
        records_before = list(b.rglob("*.json"))
        rerun, _ = run(argv, b)
        na, nb = numbers(a), numbers(b)
        print(f"task {args.task}, --limit {args.limit}: uninterrupted {full:.1f} s; SIGKILL at {killed_at:.1f} s "
              f"(exit {code}), {len(held)} checkpoint files and {len(records_before)} records at the kill; "
              f"rerun {rerun:.1f} s ({rerun / full:.2f} of uninterrupted)")
        if set(na) != set(nb):
            sys.exit(f"the runs hold different numbers: {sorted(set(na) ^ set(nb))[:5]}")
        diff = max(abs(na[k] - nb[k]) for k in na)
        print(f"compared {len(na)} numbers (metrics, standard errors, details rows): max abs difference {diff:.3g}")


if __name__ == "__main__":
    main()
