"""Tokens/s of the embedded model in float32 and bfloat16 on this machine, and what dtype `auto` picks.

Both dtypes run the same held-out 8x128-token batches, interleaved batch by batch so machine
noise hits both alike; the median time per batch gives tokens/s.

Usage:
    python benchmarks/throughput.py [--batches 6] [--batch-size 8] [--context-len 128]
"""

import argparse
import statistics
import time

import torch

from saebench.corpus import CorpusSpec, token_contexts
from saebench.models import AUTO_DTYPE_RULE, load_model, native_bf16, resolve_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-len", type=int, default=128)
    args = parser.parse_args()

    models = {dtype: load_model("smollm2-135m", dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")}
    lm = models["float32"]
    tokens = token_contexts(lm.tokenizer, CorpusSpec(), args.context_len,
                            args.batches * args.batch_size * args.context_len, 0, lm.bos_id)
    times: dict[str, list[float]] = {dtype: [] for dtype in models}
    with torch.no_grad():
        for dtype, model in models.items():  # warm-up
            model.model(tokens[: args.batch_size], use_cache=False)
        for start in range(0, len(tokens), args.batch_size):
            batch = tokens[start:start + args.batch_size]
            for dtype, model in models.items():
                t0 = time.perf_counter()
                model.model(batch, use_cache=False)
                times[dtype].append(time.perf_counter() - t0)
    per_batch = args.batch_size * args.context_len
    rate = {dtype: per_batch / statistics.median(t) for dtype, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}, "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}")
    print(f"{'dtype':10} {'tokens/s':>9}")
    for dtype, r in rate.items():
        print(f"{dtype:10} {r:9.0f}")
    print(f"ratio bfloat16 / float32 tokens/s = {rate['bfloat16'] / rate['float32']:.2f}")
    print(f"native bf16: {native_bf16('cpu')}; dtype auto picked {resolve_dtype('auto', 'cpu')} ({AUTO_DTYPE_RULE})")


if __name__ == "__main__":
    main()
