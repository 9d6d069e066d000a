"""On-disk cache of a task's reference passes (clean, zero- and mean-ablated), reused across runs.

Scoring one new encoder should cost one spliced pass, not the clean, zero and mean passes
again. A task stores what those passes produced for a key that names everything they depend
on (model, revision, dtype, device type, hookpoint, corpus, seed, context length, token
count, splice settings, library versions). An entry is a folder holding `data.safetensors` and
`meta.json` (the key, the tensors' names and shapes, and the sha256 of the data file),
published by an atomic rename. On load the key, the checksum, the shapes and the token ids
are checked; an entry that fails any check is reported in one line, deleted and recomputed,
never used. Item-scoring tasks (lambada, CBT, lm-eval tasks) keep their clean and zero passes as chunks
instead (`pass_entry`), under a key that also holds the sha256 of the model's logits on a fixed probe.
"""

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saebench import distributed
from saebench.checkpoints import PartialStore
from saebench.models import publish_dir
from saebench.records import config_hash, slug, write_atomic

FORMAT_VERSION = 2
"""Bump when what an entry holds changes meaning (2: ce_kl keeps no per-prediction negative entropy), and when the
pieces of `pass_entry` change: they are pickled `ItemScores` (saebench.tasks.benchmark), so a change to it, or to
what `PromptRecorder` or lm-eval's request observer put in it, needs a new version too."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ReferenceCache:
    """One cache entry: `load` what an earlier run stored for `key`, or `save` it now.

    Args:
        root: saebench's cache folder.
        task: the task the entry belongs to.
        key: everything the reference passes depend on (JSON-serialisable).
    """

    def __init__(self, root: Path, task: str, key: dict[str, Any]):
        self.key = {"format": FORMAT_VERSION, "task": task, **key}
        self.path = Path(root) / "reference" / f"{task}-{config_hash(self.key)}"

    def load(self, tokens: Tensor) -> dict[str, Tensor] | None:
        """The stored tensors, validated against the key and `tokens`; None when absent or unusable.

        In a data-parallel run rank 0 validates the entry first and says what it found; the other ranks then
        read it only when it is good, and only rank 0 deletes a bad one.
        """
        tensors, problem = None, None
        if distributed.is_main() and self.path.exists():
            try:
                tensors = self._validated(tokens)
            except Exception as exc:  # any failure means the entry cannot be trusted
                problem = str(exc) or type(exc).__name__
        found, problem = distributed.broadcast((tensors is not None, problem))
        if problem is not None:
            if distributed.is_main():
                print(f"saebench: cached reference passes in {self.path} are unusable ({problem}); recomputing them",
                      file=sys.stderr, flush=True)
                shutil.rmtree(self.path, ignore_errors=True)
            return None
        if not found or distributed.is_main():
            return tensors
        return self._validated(tokens)

    def _validated(self, tokens: Tensor) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        meta = json.loads((self.path / "meta.json").read_text())
        if meta.get("key") != json.loads(json.dumps(self.key, default=str)):
            raise ValueError("its key differs from this run's")
        data_file = self.path / "data.safetensors"
        if _sha256(data_file) != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        tensors = load_file(data_file)
        shapes = {name: list(t.shape) for name, t in tensors.items()}
        if shapes != meta.get("shapes"):
            raise ValueError("tensor shapes differ from its manifest")
        if not torch.equal(tensors["tokens"], tokens.cpu()):
            raise ValueError("its token ids differ from this run's (has the corpus or tokenizer changed?)")
        return tensors

    def discard(self, reason: str) -> None:
        """Delete this entry (found stale by a check the caller made), saying why in one line."""
        distributed.barrier()  # every rank has read it
        if distributed.is_main():
            print(f"saebench: cached reference passes in {self.path} are unusable ({reason}); recomputing them",
                  file=sys.stderr, flush=True)
            shutil.rmtree(self.path, ignore_errors=True)

    def save(self, tensors: dict[str, Tensor]) -> None:
        """Store `tensors` (must include 'tokens') atomically; a concurrent writer's entry is kept. In a
        data-parallel run rank 0 writes it and every rank returns once it is there."""
        from safetensors.torch import save_file

        if not distributed.is_main():
            distributed.barrier()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=".tmp-"))
        try:
            data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
            save_file(data, tmp / "data.safetensors")
            meta = {"key": self.key, "sha256": _sha256(tmp / "data.safetensors"),
                    "shapes": {name: list(t.shape) for name, t in data.items()}}
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=str) + "\n")
            publish_dir(tmp, self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()


def remove_entries(root: Path, task: str, **match: Any) -> int:
    """Delete the cache entries of `task` whose key has every field in `match`; returns how many.

    For benchmarks that time a cold cache without wiping a user's other entries.
    """
    removed = 0
    for entry in (Path(root) / "reference").glob(f"{task}-*"):
        try:
            key = json.loads((entry / "meta.json").read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue
        if all(key.get(k) == v for k, v in match.items()):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


PROBE_TOKENS = 16
"""Length of the probe `model_fingerprint` runs: BOS, then token ids 1..15 (modulo the vocabulary)."""


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's (a LoadedModel's) float32 logits on a fixed probe: the same model id with other weights
    or kernels gives another."""
    vocab = int(model.model.config.vocab_size)
    ids = torch.tensor([[model.bos_id, *(i % vocab for i in range(1, PROBE_TOKENS))]], device=model.device)
    with torch.inference_mode():
        logits = model.model(ids, use_cache=False).logits.float().cpu()
    return hashlib.sha256(logits.numpy().tobytes()).hexdigest()


def pass_entry(root: Path, task: str, key: dict[str, Any]) -> PartialStore:
    """The reference cache's entry for one reference pass (clean, or the zero ablation) of an item-scoring task
    (lambada, CBT, lm-eval tasks): a store of the pass's finished chunks, reused by every later run with the same
    key, whatever encoders it scores. Collective in a data-parallel run (rank 0 writes the entry's key).

    Pieces are written one chunk at a time, each by an atomic rename, so an interrupted pass leaves the chunks
    it finished for the next run; a piece that cannot be read is computed again. The key holds everything the
    pass depends on, the model's `model_fingerprint` included, so no entry is ever shared by two models and none
    has to be deleted. `meta.json` holds the key, for people and `remove_entries`.

    Args:
        root: saebench's cache folder.
        task: the task the entry belongs to.
        key: everything the pass depends on (JSON-serialisable).
    """
    key = {"format": FORMAT_VERSION, "task": task, **key}
    path = Path(root) / "reference" / f"{slug(task)}-{config_hash(key)}"
    if distributed.is_main() and not (path / "meta.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / "meta.json", json.dumps({"key": key}, indent=1, default=str) + "\n")
    distributed.barrier()
    return PartialStore(path / "pass.pt")
