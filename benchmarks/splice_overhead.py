"""Splice overhead: tokens/s of the embedded model with and without a reconstruction spliced in.

Prints tokens/s for the clean forward pass and for the same pass with the identity encoder
and the default SAE spliced at the default hookpoint, and the ratios spliced / clean time.
Passes are interleaved (clean, identity, sae, clean, ...) so machine noise hits all three
alike; the ratio is the number to read (target: SAE splice at most 1.10x clean).

    python benchmarks/splice_overhead.py [--batches 12] [--batch-size 8] [--context-len 128]
"""

import argparse
import statistics
import time

import torch

from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import BuildContext
from saebench.encoders.baselines import IdentityEncoder
from saebench.encoders.sae import SAELensEncoder
from saebench.models import cache_dir, load_model
from saebench.splice import Splice, SpliceConfig, sink_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-len", type=int, default=128)
    args = parser.parse_args()

    lm = load_model("smollm2-135m")
    hp = lm.hookpoint(lm.default_hookpoint)
    sae = SAELensEncoder.from_arg("default", BuildContext(lm, None, cache_dir(), progress=True))
    tokens = token_contexts(lm.tokenizer, CorpusSpec(), args.context_len,
                            args.batches * args.batch_size * args.context_len, 0, lm.bos_id)
    batches = tokens.split(args.batch_size)
    splices = {"identity": Splice(hp, IdentityEncoder(lm.d_model), SpliceConfig()),
               "sae:default": Splice(hp, sae, SpliceConfig())}
    times: dict[str, list[float]] = {"clean": [], **{k: [] for k in splices}}

    def forward(batch, splice=None):
        ids = batch.to(lm.device)
        start = time.perf_counter()
        with torch.no_grad():
            if splice is None:
                lm.model(ids)
            else:
                splice.set_batch(batch, sink_mask(batch, lm.bos_id))
                with splice.installed():
                    lm.model(ids)
        return time.perf_counter() - start

    forward(batches[0])  # warm-up
    for batch in batches:
        times["clean"].append(forward(batch))
        for name, splice in splices.items():
            times[name].append(forward(batch, splice))
    n_tok = args.batch_size * args.context_len
    clean = statistics.median(times["clean"])
    print(f"model {lm.model_id} ({lm.dtype}, {lm.device}, {torch.get_num_threads()} threads), hookpoint {hp.name}, "
          f"{len(batches)} batches of {args.batch_size}x{args.context_len} tokens, median per batch")
    print(f"{'pass':<12} {'tokens/s':>10} {'time / clean':>13}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12} {n_tok / med:>10.0f} {med / clean:>12.3f}x")


if __name__ == "__main__":
    main()
