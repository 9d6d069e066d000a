"""Child process for the SIGKILL resume tests: runs one task and, if asked, kills itself.

    python -m tests.unit.resume_child MODEL_DIR TASK DATA_FILE OUTPUT_DIR KILL_AFTER [RELEASE_FILE]

It checkpoints after every chunk of 4 items (every batch for ce_kl) and sends itself SIGKILL
right after its KILL_AFTER-th checkpoint file is written (0: never); with RELEASE_FILE it holds
mid-run after its first checkpoint until that file exists (for the concurrent-writer test, which
releases it once the second run has said it waits: no race with how fast processes start). It
prints how many checkpoint files it wrote.
"""

import os
import signal
import sys
import time
from pathlib import Path

from saebench.models import load_model
from saebench.runner import RunConfig, _run_task, resolve_task
from saebench.tasks import base, benchmark, ce_kl
from tests.unit.tiny_lm import ReluLatentEncoder

HOOKPOINT = "layers.0.resid_post"


def main() -> None:
    model_dir, task_name, data_file, output, kill_after = sys.argv[1:6]
    kill_after, release = int(kill_after), Path(sys.argv[6]) if len(sys.argv) > 6 else None
    benchmark.CHECKPOINT_ITEMS = 4
    ce_kl.CHECKPOINT_SECONDS = 0.0
    real_write, writes = base.PartialStore._write, [0]

    def write(path, state):
        real_write(path, state)
        writes[0] += 1
        if writes[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if writes[0] == 1 and release is not None:
            deadline = time.monotonic() + 600
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    base.PartialStore._write = staticmethod(write)
    model = load_model(model_dir, "float32", "cpu")
    params = {} if task_name == "ce_kl" else {"data_file": data_file}
    task = resolve_task(task_name, params)
    config = RunConfig(limit=2048 if task_name == "ce_kl" else None, context_len=32 if task_name == "ce_kl" else None,
                       batch_size=4, output_dir=Path(output), progress=False, cache_references=False)
    _run_task(task, model, {HOOKPOINT: [ReluLatentEncoder(model.d_model, hookpoint=HOOKPOINT)]}, config)
    print(f"checkpoints written: {writes[0]}")


if __name__ == "__main__":
    main()
