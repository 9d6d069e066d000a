"""Data-parallel runs on torch.distributed: which rank this process is, and the few collectives saebench uses.

`torchrun --nproc-per-node N -m saebench run ...` and `accelerate launch -m saebench run ...` start N
processes with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/MASTER_PORT set; `init_from_env` joins them into
one process group (nccl on CUDA, gloo on CPU). The ranks then split a task's batches (the checkpointed batch
loop in saebench.tasks.context), exchange each round's per-batch sums and merge them in batch order, so every
rank holds the same state and the numbers are bitwise those of one process. Rank 0 alone writes files
(records, checkpoints, caches) and shows progress; a fit runs on rank 0 first (`main_first`) and the other
ranks load what it cached.

Without those variables (one process) every function here is the identity or a no-op.
"""

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from saebench.errors import SaebenchError

TIMEOUT = timedelta(hours=24)
"""How long a rank waits in a collective: rank 0 may fit a default SAE or an MLP encoder while the others
wait for it (`main_first`), which on a CPU takes far longer than torch's 30-minute default."""


def launched() -> bool:
    """Whether this process was started by a launcher as one of several ranks (torchrun, accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: "str | torch.device | None" = None) -> None:
    """Join the process group torchrun / accelerate launch describe in the environment (once).

    Args:
        device: the run's --device; CUDA (asked for, or the default where a GPU is there) uses nccl, with
            this process on GPU LOCAL_RANK; anything else uses gloo.
    """
    if not launched() or dist.is_initialized():
        return
    cuda = (device is None or str(device).startswith("cuda")) and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    except (RuntimeError, ValueError) as exc:
        raise SaebenchError(f"cannot join the torch.distributed process group described by RANK/WORLD_SIZE/"
                            f"MASTER_ADDR ({str(exc).splitlines()[0]}); start saebench with torchrun or "
                            "accelerate launch, or unset WORLD_SIZE") from exc


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several ranks of a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def default_device() -> str:
    """The device a model goes to when --device is not given: this rank's GPU, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if active() else "cuda"
    return "cpu"


def rank_device(device: str | None) -> str | None:
    """The device this rank runs on: in a data-parallel run on GPUs each rank has its own, GPU LOCAL_RANK,
    whatever CUDA device the (shared) command line names; otherwise `device` itself."""
    if active() and device is not None and device.startswith("cuda"):
        return default_device()
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (the object itself, alone, in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_agree(what: str, value: Any) -> None:
    """Raise SaebenchError on every rank unless all ranks hold the same `value` (e.g. the run's settings)."""
    values = gather(value)
    for r, other in enumerate(values):
        if other != values[0]:
            raise SaebenchError(f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {r} has {other!r}; "
                                "start every rank with the same command line")


@contextmanager
def main_first(what: str) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks, which find what rank 0 cached (a fit, a trained
    SAE) and load it. An error on rank 0 is raised on every rank, in one line, instead of leaving them waiting.

    The block must not use collectives: only rank 0 runs it at first.
    """
    if not active():
        yield
        return
    if is_main():
        try:
            yield
        except BaseException as exc:
            broadcast(f"{what} failed on rank 0: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            raise
        broadcast(None)
    else:
        if (error := broadcast(None)) is not None:
            raise SaebenchError(error)
        yield
