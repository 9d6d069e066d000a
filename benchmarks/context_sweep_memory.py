"""Wall time and peak memory of `context_sweep` for several numbers of sequences.

Each size runs `saebench run ... --task context_sweep --no-reuse` in its own process under
/usr/bin/time, so the peak resident memory of each run is its own. The task keeps per-position
sums only, so peak memory should not grow with the number of sequences; the script prints each
run's peak and its ratio to the first.

    python benchmarks/context_sweep_memory.py [--sequences 32 64] [--max-len 1024]
        [--encoder 'sae:default@layers.{5,15,25}.resid_post' ...]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--encoder", action="append", default=None)
    p.add_argument("--sequences", type=int, nargs="+", default=[32, 64])
    p.add_argument("--max-len", type=int, default=1024)
    args = p.parse_args()
    encoders = args.encoder or ["sae:default@layers.{5,15,25}.resid_post", "identity@layers.{5,15,25}.resid_post"]
    timer = shutil.which("time") or "/usr/bin/time"
    saebench = str(Path(sys.executable).parent / "saebench")
    rows = []
    for n in args.sequences:
        with tempfile.TemporaryDirectory() as out:
            cmd = [timer, "-f", "%e %M", saebench, "run", "--model", args.model, "--task", "context_sweep",
                   "--limit", str(n), "--max-len", str(args.max_len), "--no-reuse", "--quiet", "--output", out]
            for enc in encoders:
                cmd += ["--encoder", enc]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"saebench failed for {n} sequences:\n{done.stderr[-2000:]}")
            seconds, kbytes = done.stderr.strip().splitlines()[-1].split()
            rows.append((n, float(seconds), int(kbytes) / 1024))
    print(f"context_sweep, {args.max_len} tokens per sequence, encoders: {' '.join(encoders)}")
    print(f"{'sequences':>9} {'wall s':>8} {'peak RSS MiB':>13} {'peak / first':>13} {'s per sequence':>15}")
    for n, seconds, mib in rows:
        print(f"{n:>9} {seconds:>8.1f} {mib:>13.0f} {mib / rows[0][2]:>13.2f} {seconds / n:>15.2f}")


if __name__ == "__main__":
    main()
