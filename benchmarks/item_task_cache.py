"""Wall time of an item-scoring task (lambada, cbt_cn) for a new encoder with and without the reference cache.

In one process, on a temporary cache folder: (1) another encoder with the cache on and cold (it fills the
cache, and pays what a first run pays: preparing the data, warming up); (2) the encoder with the cache off
(clean, zero and spliced passes: the baseline); (3) the encoder again with the cache warm (only its spliced
pass). Prints the times, the ratio (2)/(3), and whether every metric, standard error and per-item detail of
(3) equals (2) bit for bit.

    python benchmarks/item_task_cache.py --data-file ../shared/data/lambada_test.jsonl --limit 300
    python benchmarks/item_task_cache.py --task cbt_cn --data-file ../shared/data/cbt_raw_text/cbtest_CN_test_2500ex.txt
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="lambada", choices=["lambada", "cbt_cn"])
    p.add_argument("--encoder", default="sae:default?train_tokens=100000&epochs=3")
    p.add_argument("--other-encoder", default="identity", help="the encoder of the cold run that fills the cache")
    p.add_argument("--hookpoint", default="layers.15.resid_post")
    p.add_argument("--data-file", required=True)
    p.add_argument("--limit", type=int, default=300, help="items")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # the reference cache in a fresh folder; trained SAEs and models still come from the user's cache
        from saebench.models import cache_dir, load_model

        user_cache = cache_dir()
        os.environ["SAEBENCH_CACHE"] = str(Path(tmp) / "cache")
        (Path(tmp) / "cache").mkdir()
        for shared in ("saes", "models", "latent_samples"):  # what the encoder builds from, not the references
            if (user_cache / shared).exists():
                (Path(tmp) / "cache" / shared).symlink_to(user_cache / shared)
        from saebench.runner import RunConfig, build_encoders, evaluate

        model = load_model(args.model)
        # an SAE missing from the cache is trained here, untimed, not inside the first timed run that builds it
        build_encoders([args.encoder, args.other_encoder], model, RunConfig(hookpoint=args.hookpoint))

        def run(name: str, encoder: str, cache: bool) -> tuple[float, list]:
            config = RunConfig(hookpoint=args.hookpoint, limit=args.limit, batch_size=args.batch_size,
                               output_dir=Path(tmp) / name, progress=False, reuse=False, cache_references=cache,
                               task_params={"data_file": args.data_file})
            start = time.perf_counter()
            (record,) = evaluate(model, [encoder], [args.task], config)
            seconds = time.perf_counter() - start
            (details,) = (Path(tmp) / name).rglob("*.details.jsonl")
            return seconds, [record.metrics, record.stderr, details.read_text().splitlines()]

        # each run loads the task's data and builds its encoder itself: the same fixed cost in all three
        cold, _ = run("cold", args.other_encoder, True)
        off, baseline = run("off", args.encoder, False)
        warm, cached = run("warm", args.encoder, True)
    print(f"{args.task}, {args.limit} items, {model.name} ({model.dtype}), {args.encoder} @ {args.hookpoint}")
    for what, seconds in ((f"cache cold, {args.other_encoder} (fills it):", cold),
                          ("cache off (clean + zero + spliced passes):", off),
                          ("cache warm (spliced pass only):", warm)):
        print(f"{what:44s}{seconds:7.1f} s")
    print(f"ratio off / warm: {off / warm:.2f}x")
    same = json.dumps(baseline, sort_keys=True) == json.dumps(cached, sort_keys=True)
    print(f"metrics, standard errors and per-item details equal to the cache-off run: {same}")


if __name__ == "__main__":
    main()
