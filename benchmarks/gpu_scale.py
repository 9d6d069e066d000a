"""The GPU measurements at size, as one prepared script (about 10 minutes on one H100 with the defaults).

On a random-weight preset (default random-gemma-2-2b: Gemma-2-2B's shape, seeded random weights, nothing
downloaded) in dtype auto (bf16 on a GPU that has it), in one process:

  capture   activations for the default SAE's training set at the preset's hookpoint (seconds)
  train     the default SAE (sae-lens's trainer, TopK k=32, 8 x d_model latents) on those activations, on the
            GPU; then the same trainer on the same first --cpu-samples activations on the GPU and on the CPU,
            samples/s of each and their ratio (the CPU is given fewer samples: it is that much slower)
  ce_kl     with 1, 4 and 8 encoders (the trained SAE, then copies of it at other TopK k), reference cache
            off: tokens/s of evaluation tokens and peak GPU memory (torch.cuda.max_memory_allocated)
  run_evals sae-lens's run_evals on the same model object, SAE and tokens, through sae-lens's TransformerLens
            bridge (as benchmarks/vs_saelens.py does), as a wall-time ratio to saebench's 1-encoder ce_kl;
            where the bridge cannot be built offline for this shape, the reason is printed instead

Each phase prints as it finishes. The saebench cache goes to a temporary folder, so every number is cold.

Usage:
    python benchmarks/gpu_scale.py [--shape random-gemma-2-2b] [--device cuda] [--tokens 65536]
                                   [--train-tokens 200000] [--cpu-samples 20000] [--batch-size 8]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def timed(fn, device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def train_rate(lm, hookpoint, acts: torch.Tensor, device: str, dest: Path) -> float:
    """Samples/s of the default SAE's trainer (one epoch) on `acts`, on `device`."""
    from saebench.capture import TensorTrainingSet
    from saebench.encoders.default_sae import DefaultSAEConfig, _train

    cfg = DefaultSAEConfig(epochs=1)
    build = SimpleNamespace(model=SimpleNamespace(device=device, d_model=lm.d_model, model_id=lm.model_id,
                                                  name=lm.name), progress=False)
    data = TensorTrainingSet(acts.to(device), {"corpus": "wiki:train"})
    seconds, _ = timed(lambda: _train(build, hookpoint, cfg, data, dest), device)
    return len(acts) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="random-gemma-2-2b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=65_536, help="ce_kl evaluation tokens")
    parser.add_argument("--train-tokens", type=int, default=200_000, help="the default SAE's training set")
    parser.add_argument("--cpu-samples", type=int, default=20_000, help="activations for the GPU-vs-CPU trainer rate (at least one batch: 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoders", default="1,4,8")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="saebench-gpu-"))
    os.environ["SAEBENCH_CACHE"] = str(work / "cache")  # cold: nothing reused from an earlier run

    from saebench.capture import corpus_training_set
    from saebench.encoders.base import BuildContext
    from saebench.encoders.default_sae import DefaultSAEConfig, default_sae_dir
    from saebench.models import load_model
    from saebench.runner import RunConfig, evaluate

    sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmarks' helpers
    import vs_saelens
    from ce_kl_cost import k_copies

    dev = args.device
    build_s, lm = timed(lambda: load_model(args.shape, "auto", dev), dev)
    hp = lm.hookpoint(lm.default_hookpoint)
    print(f"{args.shape} on {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'CPU'}), dtype "
          f"{lm.dtype}, hookpoint {hp.name}: built in {build_s:.1f} s", flush=True)

    cfg = DefaultSAEConfig(train_tokens=args.train_tokens)
    data = corpus_training_set(lm, hp.name, "wiki", args.batch_size, False, cfg.train_tokens, cfg.context_len,
                               cfg.seed, cfg.outlier_factor)
    capture_s, acts = timed(data.activations, dev)
    print(f"capture: {len(acts)} training activations in {capture_s:.1f} s", flush=True)
    build = BuildContext(lm, hp.name, work / "cache", 0, False, batch_size=args.batch_size)
    train_s, (sae_dir, _) = timed(lambda: default_sae_dir(build, {"train_tokens": str(args.train_tokens)}), dev)
    print(f"train: the default SAE ({cfg.epochs} epochs of {len(acts)}) on {dev} in {train_s:.1f} s "
          f"(activations already captured)", flush=True)
    sub = acts[:args.cpu_samples].cpu()
    gpu_rate = train_rate(lm, hp, sub, dev, work / "rate-gpu")
    cpu_rate = train_rate(lm, hp, sub, "cpu", work / "rate-cpu")
    print(f"trainer on {len(sub)} activations: {dev} {gpu_rate:,.0f} samples/s, cpu {cpu_rate:,.0f} samples/s "
          f"({gpu_rate / cpu_rate:.1f}x)", flush=True)

    one_s = None
    for n in (int(x) for x in args.encoders.split(",")):
        specs = k_copies(Path(sae_dir), work / "copies", n)
        config = RunConfig(limit=args.tokens, batch_size=args.batch_size, output_dir=work / f"runs-{n}", reuse=False,
                           progress=False, cache_references=False)
        peak_reset(dev)
        seconds, recs = timed(lambda: evaluate(lm, specs, ["ce_kl"], config), dev)
        one_s = seconds if n == 1 else one_s
        peak = peak_gib(dev)
        print(f"ce_kl, {n} encoder(s), {args.tokens} tokens: {seconds:.1f} s, {args.tokens / seconds:,.0f} tokens/s, "
              f"peak GPU memory {'n/a' if peak is None else f'{peak:.2f} GiB'}; ce_loss_recovered of the first "
              f"{recs[0].metrics['ce_loss_recovered']:.4f}", flush=True)

    try:
        vs_saelens.MODEL = lm.model_id.split(":", 1)[-1]
        tokens = vs_saelens.draw_contexts(lm, args.tokens, args.batch_size)
        bridge = vs_saelens.boot_bridge(lm)
        _, sl_wall = vs_saelens.run_saelens(bridge, Path(sae_dir), tokens.to(lm.device), args.batch_size,
                                            vs_saelens.Tap())
        print(f"sae-lens run_evals on the same model, SAE and {tokens.numel()} tokens: {sl_wall:.1f} s; saebench's "
              f"1-encoder ce_kl / run_evals, per token = {(one_s / args.tokens) / (sl_wall / tokens.numel()):.2f} "
              "(run_evals reads whole batches of 128-token contexts)", flush=True)
    except Exception as exc:  # noqa: BLE001 - the other numbers stand without it
        print(f"sae-lens run_evals not measured: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
