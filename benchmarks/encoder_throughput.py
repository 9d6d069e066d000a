"""Encoder throughput: tokens/s of every encoder family on one dictionary, and the ratio to the SAE.

Builds a sae-lens TopK SAE (d_in 576 -> 2304 latents, k 32: the default SAE's shape) and, on its
decoder, ito (MP, OMP, GP, OMP refit from the SAE's code), sparse_coding (FISTA, top-k) and mlp
encoders (hidden 576 and 2304; their weights are untrained, which does not change their cost). Then
encodes the same activations with each, interleaved over several rounds so machine noise hits all
alike, and prints median tokens/s, the time ratio to the SAE encoder, FLOPs per token (as each
encoder reports them) and the GFLOP/s that implies. Activations are the default SAE's layer of the
embedded model when `--real` and its cache exist, else Gaussian with the same width.

With `--plain` (for a machine without sae-lens) the dictionary is a random unit-norm one given to
every encoder, and the SAE is saebench's own linear + TopK encoder on it (the same cost); `--check`
also encodes on the CPU and prints the largest difference of each training-free encoder's codes
between the two devices.

    python benchmarks/encoder_throughput.py [--tokens 4096] [--rounds 3] [--device cpu] [--real] [--plain] [--check]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saebench.encoders.base import BuildContext, TensorTrainingSet, dense, unknown_text

SPECS = ["sae:{sae}", "ito:sae:{sae}?method=mp", "ito:sae:{sae}?method=gp", "ito:sae:{sae}?method=omp",
         "ito:sae:{sae}?method=omp&init=encoder", "sparse_coding:sae:{sae}?method=fista",
         "sparse_coding:sae:{sae}?method=topk", "mlp:sae:{sae}?hidden=576&steps=1", "mlp:sae:{sae}?hidden=2304&steps=1"]


def activations(tokens: int, real: bool) -> torch.Tensor:
    """(tokens, 576) activations: the embedded model's layer 15 (held-out text) or Gaussian."""
    if real:
        from saebench.models import load_model
        from saebench.capture import corpus_training_set

        lm = load_model("smollm2-135m")
        return corpus_training_set(lm, "layers.15.resid_post", progress=False, tokens=tokens).activations()[:tokens]
    return torch.randn(tokens, 576, generator=torch.Generator().manual_seed(0)) * 7.0


def plain_encoders(acts: torch.Tensor, device: str) -> dict:
    """The same families on a random unit-norm dictionary given to them (the SAE: linear + TopK, k 32)."""
    W = torch.randn(2304, 576, generator=torch.Generator().manual_seed(1))
    build = BuildContext(None, None, None, progress=False, width=576, dictionary=(W / W.norm(dim=1, keepdim=True))
                         .to(device), training=TensorTrainingSet(acts, {"benchmark": True}),
                         option_defaults={"*": {"steps": "1"}})
    specs = {"sae": "sae?k=32"} | {s.format(sae="S").replace("sae:S", "sae"): s.format(sae="S").replace(":sae:S", "")
                                   .replace("mlp?hidden=576&steps=1", "mlp?hidden=576&k=32")
                                   .replace("mlp?hidden=2304&steps=1", "mlp?hidden=2304&k=32")
                                   .replace("method=topk", "method=topk&k=32")
                                   .replace("ito?", "ito?k=32&")
                                   for s in SPECS[1:]}
    return {name: build.build(spec) for name, spec in specs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="layer-15 activations of the embedded model")
    parser.add_argument("--plain", action="store_true", help="a random given dictionary; no sae-lens needed")
    parser.add_argument("--check", action="store_true", help="compare training-free encoders' codes with the CPU's")
    args = parser.parse_args()

    torch.manual_seed(0)
    acts = activations(args.tokens, args.real).to(args.device)
    if args.plain:
        encoders = plain_encoders(acts, args.device)
    else:
        from sae_lens import TopKSAE, TopKSAEConfig

        with tempfile.TemporaryDirectory() as tmp:
            TopKSAE(TopKSAEConfig(d_in=576, d_sae=2304, k=32)).save_model(Path(tmp) / "sae")
            build = BuildContext(None, None, None, progress=False, width=576,
                                 training=TensorTrainingSet(acts, {"benchmark": True}))
            encoders = {spec.format(sae="S").replace("sae:S", "sae"): build.build(spec.format(sae=Path(tmp) / "sae"))
                        for spec in SPECS}
    context = unknown_text(len(acts), args.device)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    l0 = {}
    for _ in range(args.rounds):
        for name, enc in encoders.items():
            start = time.perf_counter()
            with torch.no_grad():
                codes = enc.encode(acts, context)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            l0[name] = float((dense(codes) != 0).sum(1).float().mean())
    if args.check and args.plain and args.device != "cpu":
        # the same dictionary on the CPU: encoders that learn nothing must give the same codes there
        on_cpu = plain_encoders(acts.cpu(), "cpu")
        for name in (n for n in encoders if n.startswith(("ito", "sparse_coding")) and "init=encoder" not in n):
            with torch.no_grad():
                there = dense(encoders[name].encode(acts, context)).float().cpu()
                here = dense(on_cpu[name].encode(acts.cpu(), unknown_text(len(acts)))).float()
            same = ((there != 0) == (here != 0)).float().mean()
            print(f"check {name}: max |code {args.device} - code cpu| = {(there - here).abs().max():.2e}, "
                  f"same support on {same:.4%} of entries")
    base = statistics.median(times["sae"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.tokens} tokens x d_in 576 -> 2304 latents, median of {args.rounds} rounds")
    print(f"{'encoder':42s} {'tokens/s':>10s} {'time / sae':>11s} {'MFLOP/token':>12s} {'GFLOP/s':>8s} {'L0':>6s}")
    for name, enc in encoders.items():
        t = statistics.median(times[name])
        flops = enc.encode_flops or 0.0
        print(f"{name:42s} {args.tokens / t:10.0f} {t / base:11.1f} {flops / 1e6:12.2f} "
              f"{flops * args.tokens / t / 1e9:8.1f} {l0[name]:6.1f}")


if __name__ == "__main__":
    main()
