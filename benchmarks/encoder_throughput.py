"""Encoder throughput: tokens/s of every encoder family on one dictionary, and the ratio to the SAE.

Builds a sae-lens TopK SAE (d_in 576 -> 2304 latents, k 32: the default SAE's shape) and, on its
decoder, ito (MP, OMP, GP, OMP refit from the SAE's code), sparse_coding (FISTA, top-k) and mlp
encoders (hidden 576 and 2304; their weights are untrained, which does not change their cost). Then
encodes the same activations with each, interleaved over several rounds so machine noise hits all
alike, and prints median tokens/s, the time ratio to the SAE encoder, FLOPs per token (as each
encoder reports them) and the GFLOP/s that implies. Activations are the default SAE's layer of the
embedded model when `--real` and its cache exist, else Gaussian with the same width.

    python benchmarks/encoder_throughput.py [--tokens 4096] [--rounds 3] [--device cpu] [--real]
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
        from saebench.training import corpus_training_set

        lm = load_model("smollm2-135m")
        return corpus_training_set(lm, "layers.15.resid_post", False, tokens=tokens).activations()[:tokens]
    return torch.randn(tokens, 576, generator=torch.Generator().manual_seed(0)) * 7.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="layer-15 activations of the embedded model")
    args = parser.parse_args()
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    acts = activations(args.tokens, args.real).to(args.device)
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
