"""How the runner accounts for answers that can fail (an LLM simulator's): each task's part of an encoder's
counts, summed over the ranks of a data-parallel run, and the share that stops a record from being written."""

from typing import Any

from saebench.encoders.base import Encoder

FAILURE_KEYS = ("asked", "failed", "unparsed")
"""How an encoder whose answers can fail (llm_sim's LLM) says so: Encoder.report() keys 'asked' (answers asked
for), 'failed' (none after the retries) and 'unparsed' (unreadable), counted since it was built, and
'first_error' / 'last_error' (in full; '' if none). The runner takes each task's part of the counts, writes it to
the record's extra.failed_answers and writes no record where it exceeds RunConfig.max_failed."""


def answer_counts(enc: Encoder) -> dict[str, Any] | None:
    """An encoder's answer counts and errors (FAILURE_KEYS) since it was built; None when it reports none."""
    report = enc.report()
    if not all(isinstance(report.get(k), int) for k in FAILURE_KEYS):
        return None
    return {k: report[k] for k in FAILURE_KEYS} | {k: str(report.get(k) or "") for k in ("first_error", "last_error")}


def task_answers(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """One task's part of an encoder's answer counts, and its first error in full (None if none): the encoder's
    first, or when an earlier task of the run had failures already, the latest (counters are kept per encoder)."""
    if after is None:
        return None
    before = before or {"asked": 0, "failed": 0, "unparsed": 0}
    out: dict[str, Any] = {k: after[k] - before[k] for k in FAILURE_KEYS}
    earlier = before["failed"] + before["unparsed"] > 0
    out["first_error"] = ((after["last_error"] if earlier else after["first_error"]) or None
                          if out["failed"] + out["unparsed"] else None)
    return out


def sum_answers(per_rank: list[dict[str, dict[str, Any] | None]]) -> dict[str, dict[str, Any] | None]:
    """The answer counts of a data-parallel run: each rank's counts added; the first error of the lowest rank
    that has one."""
    out: dict[str, dict[str, Any] | None] = {}
    for key in per_rank[0]:
        counts = [r[key] for r in per_rank if r.get(key) is not None]
        if not counts:
            out[key] = None
            continue
        out[key] = {k: sum(c[k] for c in counts) for k in FAILURE_KEYS}
        out[key]["first_error"] = next((c["first_error"] for c in counts if c["first_error"]), None)
    return out


def too_many_failed(counts: dict[str, Any] | None, max_failed: float) -> bool:
    """Whether failed plus unparsed answers (a record's extra.failed_answers) exceed `max_failed` of those asked."""
    return counts is not None and counts["failed"] + counts["unparsed"] > max_failed * counts["asked"]
