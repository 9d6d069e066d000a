"""What `ce_kl` costs with N encoders, with and without prefix reuse and the reference-pass cache.

In one process, on the embedded model at layers.15.resid_post, for N = 1, 4 and 8 encoders
(the default SAE and copies of it run at other k, so every encoder does real work):

  off   prefix reuse and the reference cache switched off (every pass is a full forward pass)
  cold  both on, reference cache empty (clean, zero and mean passes computed and stored)
  warm  both on, reference cache filled by the cold run

Each is timed as the wall time of `evaluate()` (model already loaded, records not reused) and
as forward-equivalents: wall time / (batches x median time of one clean forward pass of a
batch, input ids to logits; everything else a run does, log-softmax and KL over the vocabulary
included, counts against saebench). The goal of the speed issue is <= 1 + N (1 - 15/30 + h) cold and <= N (1 - 15/30 + h)
warm, h being the LM head's share of a forward pass, also measured here. The script also prints
the largest difference of every metric between the three modes, and suffix-pass tokens/s at
several batch sizes (whether batching several encoders' suffix passes together would pay).

Usage:
    python benchmarks/ce_kl_cost.py [--tokens 20480] [--encoders 1,4,8]
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saebench.encoders.base import BuildContext
from saebench.forward import HookpointForward
from saebench.models import LoadedModel, cache_dir, load_model
from saebench.runner import RunConfig, evaluate
from saebench.tasks.base import EvalText, RunSettings
from saebench.tasks.reference import remove_entries
from saebench.encoders.default_sae import default_sae_dir

HOOKPOINT = "layers.15.resid_post"
K_VARIANTS = (32, 16, 48, 8, 64, 24, 40, 12)
"""The default SAE is TopK with k = 32; the other encoders are the same SAE run at another k."""


def sae_variants(lm: LoadedModel, folder: Path, n: int) -> list[str]:
    """Spec strings of n encoders: the default SAE, then copies of it with another TopK k."""
    src, _ = default_sae_dir(BuildContext(lm, HOOKPOINT, cache_dir()))
    return ["sae:default", *k_copies(src, folder, n)[1:]]


def k_copies(src: Path, folder: Path, n: int) -> list[str]:
    """Spec strings of n encoders: the sae-lens TopK SAE at `src`, then copies of it (in `folder`) at other k."""
    specs = [f"sae:{src}"]
    for k in K_VARIANTS[1:n]:
        dest = folder / f"k{k}"
        if not dest.exists():
            shutil.copytree(src, dest)
            cfg = json.loads((dest / "cfg.json").read_text())
            cfg["k"] = k
            (dest / "cfg.json").write_text(json.dumps(cfg))
        specs.append(f"sae:{dest}")
    return specs


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def unit_costs(lm: LoadedModel, tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Median seconds per batch of: a clean forward pass (to logits), the prefix to the hookpoint, the
    LM head alone, and the suffix from the hookpoint (to logits)."""
    fwd = HookpointForward(lm, lm.hookpoint(HOOKPOINT))
    batch = tokens[:batch_size]
    acts = fwd.capture(batch)
    normed = fwd.resume(acts, batch).normed
    out = {
        "forward": median_time(lambda: lm.model(batch, use_cache=False).logits, 5),
        "prefix": median_time(lambda: fwd.capture(batch), 5),
        "head": median_time(lambda: fwd.logits_from_normed(normed), 5),
        "suffix": median_time(lambda: fwd.resume(acts, batch).logits, 5),
    }
    for rows in (batch_size, 2 * batch_size, 4 * batch_size):
        big = tokens[:rows]
        if len(big) < rows:
            break
        big_acts = fwd.capture(big)
        fwd.resume(big_acts, big)  # records the shape
        out[f"suffix_rows_{rows}"] = median_time(lambda: fwd.resume(big_acts, big), 3) / rows
    return out


def clear_reference_cache(lm: LoadedModel, tokens: int) -> None:
    remove_entries(cache_dir(), "ce_kl", model=lm.model_id, hookpoint=HOOKPOINT, tokens=tokens)


def timed_run(lm: LoadedModel, specs: list[str], tokens: int, out: Path, **kw) -> tuple[float, dict]:
    config = RunConfig(limit=tokens, output_dir=out, reuse=False, progress=False, **kw)
    t0 = time.perf_counter()
    recs = evaluate(lm, specs, ["ce_kl"], config)
    return time.perf_counter() - t0, {r.encoder["label"]: r.metrics for r in recs}


def max_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest |a - b| per metric over encoders."""
    out: dict[str, float] = {}
    for label in a:
        for name, value in a[label].items():
            if value is not None:
                out[name] = max(out.get(name, 0.0), abs(value - b[label][name]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--encoders", default="1,4,8")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    counts = [int(n) for n in args.encoders.split(",")]

    lm = load_model("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="ce_kl_cost-"))
    specs = sae_variants(lm, work, max(counts))
    tokens = EvalText(lm, RunSettings(batch_size=args.batch_size)).contexts(args.tokens, 128)
    n_batches = -(-len(tokens) // args.batch_size)
    unit = unit_costs(lm, tokens, args.batch_size)
    h = unit["head"] / unit["forward"]
    print(f"model dtype {lm.dtype}; {len(tokens)} contexts x 128 tokens, {n_batches} batches of {args.batch_size}")
    print(f"one clean forward pass: {unit['forward']:.3f} s/batch; as a fraction of it: prefix to the hookpoint "
          f"{unit['prefix'] / unit['forward']:.3f}, suffix from it {unit['suffix'] / unit['forward']:.3f}, "
          f"LM head h = {h:.3f}")
    rows = sorted(k for k in unit if k.startswith("suffix_rows_"))
    print("suffix pass tokens/s by batch rows: " + ", ".join(
        f"{k.rsplit('_', 1)[1]} rows {128 / unit[k]:.0f}" for k in rows))
    print(f"\n{'N':>2} {'mode':5} {'wall s':>8} {'fwd-eq':>7} {'goal':>6} {'off/this':>9}")
    for n in counts:
        clear_reference_cache(lm, args.tokens)
        off_s, off_m = timed_run(lm, specs[:n], args.tokens, work / f"off{n}", reuse_prefix=False,
                                 cache_references=False)
        cold_s, cold_m = timed_run(lm, specs[:n], args.tokens, work / f"cold{n}")
        warm_s, warm_m = timed_run(lm, specs[:n], args.tokens, work / f"warm{n}")
        fwd_total = n_batches * unit["forward"]
        goals = {"off": float("nan"), "cold": 1 + n * (1 - 15 / 30 + h), "warm": n * (1 - 15 / 30 + h)}
        for mode, secs in (("off", off_s), ("cold", cold_s), ("warm", warm_s)):
            print(f"{n:2d} {mode:5} {secs:8.1f} {secs / fwd_total:7.2f} {goals[mode]:6.2f} {off_s / secs:9.2f}")
        diffs = {"cold": max_diff(off_m, cold_m), "warm": max_diff(off_m, warm_m)}
        for mode, diff in diffs.items():
            worst = max(diff, key=diff.get)
            print(f"   max |off - {mode}| over metrics: {diff[worst]:.3g} ({worst}); "
                  + ", ".join(f"{k} {v:.2g}" for k, v in diff.items()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
