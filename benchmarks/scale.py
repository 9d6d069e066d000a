"""Costs at size on the CPU: clean-forward tokens/s, ce_kl's cost per extra encoder, peak memory.

For the random-weight presets (published shapes, seeded random weights: `saebench list models`), each
in a fresh process, at two token counts of 128-token contexts:

  build     seconds to build the model (seeded init in the run's dtype) and peak RSS while building
  forward   tokens/s of a clean forward pass (ids to logits, batches of the shape's batch size)
  ce_kl     `evaluate(..., ["ce_kl"])` with 1 encoder and with 1 + k (reuse and the reference cache off):
            ce_kl(1) in forward-equivalents = T(1) / T(clean forward of the same tokens), and the cost of
            each extra encoder = (T(1 + k) - T(1)) / k / T(clean forward)
  peak      peak RSS of each phase (ru_maxrss after resetting the high-water mark through
            /proc/self/clear_refs; where that is refused, the high-water mark since the process started)

The three phases run interleaved, --rounds times, and each keeps its fastest time (work of other
processes only ever adds time; the 1-minute load average is printed beside the results).

The encoders are sae-lens TopK SAEs with random weights (d_sae = 4 d_model, k = 32, one seed each) at the
preset's default hookpoint, so every one runs a real suffix pass: identity would reuse the clean pass, and
zero and mean the task's own ablation passes. Default token counts are one full batch and four full
batches per shape (a Gemma-2-2B forward pass on 2 cores runs ~10-60 tokens/s); --tokens and --batch-size
override them for every shape. The default run took ~15 minutes on a busy 2-core CPU.

Usage:
    python benchmarks/scale.py [--shapes random-gpt2-small ...] [--tokens 128 512] [--batch-size 1]
                               [--extra 2] [--rounds 2] [--dtype auto]
"""

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTEXT_LEN = 128
DEFAULTS = {  # shape: (token counts, batch size); each first count is one full batch, the second four
    "random-gpt2-small": ((1024, 4096), 8),
    "random-llama-3.2-1b": ((128, 512), 1),
    "random-gemma-2-2b": ((128, 512), 1),
}


def reset_peak() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def random_saes(lm, folder: Path, n: int) -> list[str]:
    """Spec strings of n sae-lens TopK SAEs with random weights at the model's default hookpoint."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    hook = lm.hookpoint(lm.default_hookpoint).transformer_lens_name
    specs = []
    for seed in range(n):
        torch.manual_seed(seed)
        TopKSAE(TopKSAEConfig(d_in=lm.d_model, d_sae=4 * lm.d_model, k=32, metadata=SAEMetadata(hook_name=hook))
                ).save_model(folder / f"sae{seed}")
        specs.append(f"sae:{folder / f'sae{seed}'}")
    return specs


def child(shape: str, counts: list[int], batch_size: int, extra: int, dtype: str, rounds: int) -> dict:
    """Every measurement of one shape, in this process; returns them as a dict."""
    import torch

    from saebench.corpus import CorpusSpec, token_contexts
    from saebench.models import load_model
    from saebench.runner import RunConfig, evaluate

    importlib.import_module("saebench.tasks.ce_kl")  # imported before anything is timed, as sae_lens below
    exact = reset_peak()
    t0 = time.perf_counter()
    lm = load_model(shape, dtype, "cpu")
    out = {"shape": shape, "dtype": lm.dtype, "hookpoint": lm.default_hookpoint, "exact_peaks": exact,
           "params": sum(p.numel() for p in lm.model.parameters()), "build_s": time.perf_counter() - t0,
           "build_gib": peak_gib(), "batch_size": batch_size, "extra": extra, "rounds": rounds,
           "load": [os.getloadavg()[0]], "rows": {}}
    work = Path(tempfile.mkdtemp(prefix="saebench-scale-"))
    specs = random_saes(lm, work, 1 + extra)

    @torch.no_grad()
    def forward(tokens: torch.Tensor) -> None:
        for start in range(0, len(tokens), batch_size):
            lm.model(tokens[start:start + batch_size], use_cache=False).logits

    def ce_kl(n: int, encoders: list[str]) -> None:
        evaluate(lm, encoders, ["ce_kl"], RunConfig(limit=n, context_len=CONTEXT_LEN, batch_size=batch_size,
                                                    output_dir=work / "runs", reuse=False, cache_references=False,
                                                    progress=False))

    phases = {"forward": forward, "ce_kl_one": lambda n: ce_kl(n, specs[:1]), "ce_kl_more": lambda n: ce_kl(n, specs)}
    contexts = {n: token_contexts(lm.tokenizer, CorpusSpec(), CONTEXT_LEN, n, 0, lm.bos_id) for n in counts}
    forward(contexts[counts[0]][:batch_size])  # warm-up: first-call kernel setup is not a per-token cost
    for n in counts:
        times: dict[str, list[float]] = {name: [] for name in phases}
        peaks = dict.fromkeys(phases, 0.0)
        for _ in range(rounds):  # interleaved, so that other work on the machine hits every phase alike
            for name, run in phases.items():
                reset_peak()
                t0 = time.perf_counter()
                run(contexts[n] if name == "forward" else n)
                times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], peak_gib())
        # the minimum: interference only ever adds time
        out["rows"][n] = {"tokens": contexts[n].numel(), **{f"{k}_s": min(v) for k, v in times.items()},
                          **{f"{k}_gib": v for k, v in peaks.items()}}
        out["load"].append(os.getloadavg()[0])
        print(f"  {shape}: {n} tokens done", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)  # the SAEs and records: up to 0.5 GB for Gemma-2-2B
    return out


def report(results: list[dict]) -> None:
    """Print one table of the measurements and one of how each grows from the first token count to the second."""
    from tabulate import tabulate

    print(tabulate([(r["shape"], r["dtype"], f"{r['params'] / 1e6:.1f}M", r["hookpoint"], r["batch_size"],
                     f"{r['build_s']:.1f}", f"{r['build_gib']:.2f}", " ".join(f"{x:.1f}" for x in r["load"]))
                    for r in results],
                   headers=("shape", "dtype", "parameters", "hookpoint", "batch", "build s", "build peak GiB",
                            "load avg (start, after each count)")))
    rows, growth = [], []
    for r in results:
        per = []
        for n, m in r["rows"].items():
            fwd, one, more = m["forward_s"], m["ce_kl_one_s"], m["ce_kl_more_s"]
            per.append({"tokens/s": m["tokens"] / fwd, "ce_kl(1) fwd-eq": one / fwd,
                        "per extra fwd-eq": (more - one) / r["extra"] / fwd, "forward s": fwd, "ce_kl(1) s": one,
                        "forward peak GiB": m["forward_gib"], "ce_kl(1+k) peak GiB": m["ce_kl_more_gib"]})
            rows.append([r["shape"], m["tokens"], *(f"{v:.3g}" for v in per[-1].values())])
        if len(per) == 2:
            first, second = r["rows"].values()
            growth.append([r["shape"], f"x{second['tokens'] / first['tokens']:.3g}",
                           *(f"x{per[1][k] / per[0][k]:.3g}" for k in per[0])])
    headers = ["shape", "tokens", *per[0]]
    extra, rounds = results[0]["extra"], results[0]["rounds"]
    print(f"\nk = {extra}; per extra = (T(ce_kl, 1 + k encoders) - T(ce_kl, 1)) / k / T(clean forward); "
          f"fwd-eq = forward-equivalents; times: fastest of {rounds} interleaved rounds; peak = peak RSS of the phase"
          + ("" if all(r["exact_peaks"] for r in results) else " (high-water marks: clear_refs refused)"))
    print(tabulate(rows, headers=headers, disable_numparse=True))
    print("\ngrowth from the first token count to the second (second / first)")
    print(tabulate(growth, headers=headers, disable_numparse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULTS))
    parser.add_argument("--tokens", nargs=2, type=int, help="two token counts for every shape")
    parser.add_argument("--batch-size", type=int, help="contexts per forward pass for every shape")
    parser.add_argument("--extra", type=int, default=2, help="k: encoders added to the one-encoder ce_kl run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the fastest of each is kept")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one shape in this process: its peak RSS is this shape's alone
        (shape,) = args.shapes
        print(json.dumps(child(shape, args.tokens, args.batch_size, args.extra, args.dtype, args.rounds)))
        return
    results = []
    for shape in args.shapes:
        counts, batch = DEFAULTS.get(shape, ((1024, 4096), 8))
        cmd = [sys.executable, __file__, "--child", "--shapes", shape, "--extra", str(args.extra), "--rounds", str(args.rounds),
               "--dtype", args.dtype, "--tokens", *map(str, args.tokens or counts),
               "--batch-size", str(args.batch_size or batch)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"{shape}: the measuring process failed (exit {done.returncode})")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{shape}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report(results)


if __name__ == "__main__":
    main()
