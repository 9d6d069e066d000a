"""A `saebench` command for the data-parallel tests, counting what each rank does.

    [torchrun --nproc-per-node N] -m tests.unit.parallel_child LOG_DIR KILL_RANK KILL_AFTER SAEBENCH_ARGS...
        [--then SAEBENCH_ARGS...]...

Runs `saebench.cli.main(SAEBENCH_ARGS)`, once per command given (in one process, so a launch starts Python,
torch and the ranks once for several commands), and writes LOG_DIR/rank<R>.json: per command, its exit code, the
batches this rank computed (ce_kl's, by CEKLTask._batch calls), the encoder fits it ran (MLPEncoder.fit) and the
checkpoints it wrote. A command that raises is exit code 1 (its traceback on stderr); the next one still runs. With
KILL_AFTER > 0, rank KILL_RANK sends itself SIGKILL right after its KILL_AFTER-th ce_kl batch (the checkpoint is
saved every round: CHECKPOINT_SECONDS 0); benchmark passes go in chunks of 8 items. An argument '{rank}' is replaced by the rank (to make ranks disagree).
"""

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from saebench import checkpoints, cli
from saebench.encoders.mlp import MLPEncoder
from saebench.tasks import benchmark, ce_kl


def main() -> int:
    log, kill_rank, kill_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    counts: dict = {}
    ce_kl.CHECKPOINT_SECONDS = 0.0
    benchmark.CHECKPOINT_ITEMS = 8  # a few chunks of the tests' few items, for the ranks to share
    real_batch, real_fit, real_write = ce_kl.CEKLTask._batch, MLPEncoder.fit, checkpoints.PartialStore._write

    def batch(self, *args, **kwargs):
        real_batch(self, *args, **kwargs)
        counts["batches"] += 1
        if rank == kill_rank and counts["batches"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def fit(self, *args, **kwargs):
        counts["fits"] += 1
        return real_fit(self, *args, **kwargs)

    def write(path, state):
        real_write(path, state)
        counts["checkpoints"] += 1

    ce_kl.CEKLTask._batch, MLPEncoder.fit = batch, fit
    checkpoints.PartialStore._write = staticmethod(write)
    commands, done = [[]], []
    for arg in sys.argv[4:]:
        if arg == "--then":
            commands.append([])
        else:
            commands[-1].append(arg.replace("{rank}", str(rank)))
    try:
        for command in commands:
            counts = {"code": 1, "batches": 0, "fits": 0, "checkpoints": 0}
            done.append(counts)
            try:
                counts["code"] = cli.main(command)
            except Exception:  # noqa: BLE001 - reported, and the next command still runs
                traceback.print_exc()
    finally:
        log.mkdir(parents=True, exist_ok=True)
        (log / f"rank{rank}.json").write_text(json.dumps(done))
    return max(c["code"] for c in done)


if __name__ == "__main__":
    sys.exit(main())
