"""Files a run writes as it goes and reads back after an interruption: torch state saved atomically, and
the checkpoint store of a task's in-progress state."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from saebench import distributed


def save_atomic(path: Path, state: Any) -> None:
    """torch.save `state` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save names the zip archive after the file; a name starting with "." is rejected
    # ("invalid file name"), so the temporary file must not be a dotfile.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PartialStore:
    """Atomic save/load of a task's in-progress state, so an interrupted run resumes.

    Two forms: one state object rewritten at each checkpoint (`load`/`save`), or finished
    pieces that never change once written (`load_piece`/`save_piece`, e.g. one chunk of items
    of one pass). Every file is written to a temporary name and renamed, so a run killed at any
    moment leaves either the previous checkpoint or the new one, never a torn file.

    In a data-parallel run every rank holds the same state (saebench.tasks.context.checkpointed_batches merges
    all ranks' batches): rank 0 alone reads and writes the files, and what it reads is handed to every rank,
    so no rank reads a file another is replacing.
    """

    def __init__(self, path: Path | None):
        self.path = path

    @property
    def pieces_dir(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".pieces")

    def load(self) -> Any | None:
        return self._read_on_main(self.path)

    def save(self, state: Any) -> None:
        self._write(self.path, state)

    def load_piece(self, name: str) -> Any | None:
        """A finished piece saved under `name` by an earlier (interrupted) run, else None."""
        return None if self.pieces_dir is None else self._read_on_main(self.pieces_dir / f"{name}.pt")

    def save_piece(self, name: str, state: Any) -> None:
        if self.pieces_dir is not None:
            self._write(self.pieces_dir / f"{name}.pt", state)

    def sub(self, name: str) -> "PartialStore":
        """A store of its own for one part of the run (e.g. one hookpoint), cleared with this one."""
        if self.pieces_dir is None:
            return PartialStore(None)
        return PartialStore(self.pieces_dir / f"{name}.state.pt")

    def clear(self) -> None:
        if self.path is not None and distributed.is_main():
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.pieces_dir, ignore_errors=True)

    @classmethod
    def _read_on_main(cls, path: Path | None) -> Any | None:
        """What rank 0 reads at `path`, on every rank (collective in a data-parallel run)."""
        if path is None:
            return None
        return distributed.broadcast(cls._read(path) if distributed.is_main() else None)

    @staticmethod
    def _read(path: Path | None) -> Any | None:
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a corrupt partial file is just lost progress
            return None

    @staticmethod
    def _write(path: Path | None, state: Any) -> None:
        if path is not None and distributed.is_main():
            save_atomic(path, state)
