"""Wall time of lambada with an encoder spliced in vs the clean model, in one process.

Both passes answer the same lm-eval `lambada_openai` requests through `SaebenchLM`; the clean
pass is timed first and last (averaged) so warm-up does not favour either side.

    python benchmarks/lambada_overhead.py --data-file ../shared/data/lambada_test.jsonl --items 64
"""

import argparse
import time

from saebench.lm_eval_model import SaebenchLM
from saebench.models import load_model
from saebench.runner import RunConfig, build_encoder
from saebench.tasks.lm_eval_data import load_lm_eval_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--encoder", default="sae:default")
    p.add_argument("--hookpoint", default=None)
    p.add_argument("--data-file", required=True, help="lambada_test.jsonl")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    model = load_model(args.model)
    encoder, _ = build_encoder(args.encoder, model, RunConfig(hookpoint=args.hookpoint, progress=False))
    task = load_lm_eval_task("lambada_openai", None, args.data_file)
    task.build_all_requests(limit=args.items, rank=0, world_size=1)
    lm = SaebenchLM(model, encoder=encoder, hookpoint=args.hookpoint, batch_size=args.batch_size)

    def timed(enc) -> float:
        lm.encoder = enc
        start = time.perf_counter()
        lm.loglikelihood(task.instances, disable_tqdm=True)
        return time.perf_counter() - start

    timed(None)  # warm-up
    clean_a, spliced, clean_b = timed(None), timed(encoder), timed(None)
    clean = (clean_a + clean_b) / 2
    print(f"lambada, {len(task.instances)} items, {args.model} @ {lm.hookpoint.name}, encoder {args.encoder}")
    print(f"clean   {clean:8.2f} s  ({clean_a:.2f}, {clean_b:.2f})")
    print(f"spliced {spliced:8.2f} s")
    print(f"ratio spliced/clean = {spliced / clean:.3f}")


if __name__ == "__main__":
    main()
