"""saebench command line: run, sweep, list, leaderboard."""

import argparse
import os
import sys
from pathlib import Path

from saebench.errors import SaebenchError

def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="splice encoders into a model and score them on tasks",
                       description="Splice decode(encode(x)) into MODEL at a hookpoint and score each encoder "
                                   "on each task. One JSON record per (task, encoder) goes to --output; "
                                   "finished records with the same configuration are reused.")
    p.add_argument("--model", help="preset (saebench list models), HF hub id, or local path; not needed by tasks "
                                   "without a language model (synthetic)")
    p.add_argument("--encoder", action="append", default=[], metavar="SPEC",
                   help="encoder spec, repeatable: identity, zero, mean, sae:default, sae:<path>, "
                        "sae:<release>/<sae_id>, ito:<spec>, sparse_coding[:<spec>], mlp[:<spec>], linear_sae, "
                        "llm_sim:<spec>, or a plugin's "
                        "name[:arg]; '?key=value&...' sets options; '@layers.5.resid_post' places it, "
                        "braces expand ('sae:default@layers.{5,15,25}.resid_post'), presets from "
                        "`saebench list encoders` stand for their lists")
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="task or task preset, repeatable (saebench list tasks); '?key=value&...' sets its "
                        "parameters, e.g. 'synthetic?k_active=5'")
    p.add_argument("--hookpoint", help="layers.{i}.resid_pre|resid_post|attn_out|mlp_out (sae-lens names too), e.g. "
                        "layers.15.resid_post; default: the SAE's own, else the model preset's")
    p.add_argument("--limit", type=int, help="tokens (ce_kl), items (benchmarks) or sequences (context_sweep, "
                                             "error_propagation) to evaluate, or test samples (synthetic); default per task")
    p.add_argument("--context-len", type=int, help="tokens per context of ce_kl, BOS included; default per task "
                                                   "(context_sweep takes --max-len)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which held-out contexts are drawn (default 0)")
    p.add_argument("--corpus", default="wiki", help="'wiki' (embedded, default) or hf:<dataset>[:<config>]")
    p.add_argument("--splice-bos", action="store_true",
                   help="also splice BOS/attention-sink positions (default: pass them through)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype (default: the preset's, auto for every preset: bfloat16 where the GPU or CPU runs it "
                        "natively, else float32; `saebench list models` says what auto picks here)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--gguf-file", help="GGUF file inside --model to load")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--data-file", help="local data file, given to the tasks of the run that take one (lambada: a "
                                       "lambada_test.jsonl; cbt: a CBTest question file; lm_eval:<task>: JSON/JSONL "
                                       "of its eval split)")
    p.add_argument("--max-len", type=int, help="tokens per sequence, BOS included, of context_sweep (default "
                                               "min(1024, the model's context)) and error_propagation (default 100)")
    p.add_argument("--all-at-once", action="store_true",
                   help="ce_kl: also splice each encoder given at several hookpoints at all of them in one pass "
                        "(its own row, e.g. joint:sae:default at layers.{5,15,25}.resid_post)")
    p.add_argument("--output", type=Path, default=Path("saebench_runs"), help="records folder (default ./saebench_runs)")
    p.add_argument("--no-reuse", action="store_true", help="recompute even when a finished record exists")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="run the full model for every spliced pass (default: the layers below the hookpoint run "
                        "once per batch; same numbers, slower)")
    p.add_argument("--no-reference-cache", action="store_true",
                   help="recompute the reference passes (ce_kl's clean, zero and mean passes; the clean and zero "
                        "passes of lambada, cbt and lm_eval tasks) instead of reusing them from the saebench cache "
                        "($SAEBENCH_CACHE/reference)")
    p.add_argument("--llm", metavar="MODEL",
                   help="simulator/explainer LLM of llm_sim encoders (their llm= option): a model preset, hub id or "
                        "path run in process (default the embedded smollm2-135m), 'rules' for the token baseline, "
                        "or with --llm-url the served model's name")
    p.add_argument("--llm-url", metavar="URL",
                   help="OpenAI-compatible server that llm_sim encoders ask (their llm_url= option), e.g. "
                        "http://127.0.0.1:8000/v1 from `vllm serve`")
    p.add_argument("--max-failed", type=float, default=0.02, metavar="SHARE",
                   help="largest share of an encoder's LLM answers in a task that may fail or be unreadable; above it "
                        "the task writes no record (default 0.02)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _hide_loading_bars(quiet: bool) -> None:
    """Under --quiet, transformers' own bars (loading checkpoint shards) go too."""
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _cmd_run(args) -> int:
    from saebench.report import feature_tables, results_table
    from saebench.runner import RunConfig, evaluate

    _hide_loading_bars(args.quiet)
    config = RunConfig(
        hookpoint=args.hookpoint, limit=args.limit, context_len=args.context_len, batch_size=args.batch_size,
        seed=args.seed, corpus=args.corpus, splice_bos=args.splice_bos, dtype=args.dtype, device=args.device,
        gguf_file=args.gguf_file, revision=args.revision, output_dir=args.output, reuse=not args.no_reuse,
        progress=not args.quiet, reuse_prefix=not args.no_prefix_reuse, cache_references=not args.no_reference_cache,
        task_params={k: v for k, v in (("data_file", args.data_file), ("max_len", args.max_len),
                                        ("all_at_once", args.all_at_once or None)) if v is not None},
        encoder_options={"llm_sim": {k: v for k, v in (("llm", args.llm), ("llm_url", args.llm_url)) if v}},
        max_failed=args.max_failed,
    )
    recs = evaluate(args.model, args.encoder, args.task, config)
    if _rank():  # a data-parallel run's other ranks hold the same records: rank 0 prints them
        return 0
    print(results_table(recs))
    if features := feature_tables(recs):
        print("\n" + features)
    print(f"\nrecords in {args.output}/")
    return 0


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of models x encoders x tasks x seeds from a YAML file",
                       description="Expand SWEEP.yaml (docs/sweeps.md) into jobs, each one `saebench run` of a model, "
                                   "an encoder entry, a task and a seed, and run them one after another or on Ray. "
                                   "All records go to --output; a rerun reuses finished records and computes only "
                                   "the missing ones. Exit code 1 when a job failed, 2 on bad input.")
    p.add_argument("sweep", type=Path, metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--output", type=Path, default=Path("saebench_runs"), help="records folder (default ./saebench_runs)")
    p.add_argument("--shard", metavar="I/N", help="run only jobs k with k %% N == I (0 <= I < N), e.g. "
                                                  "$SLURM_ARRAY_TASK_ID/N in a SLURM job array")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run each job as a Ray task: alone, a local Ray (or $RAY_ADDRESS's); with ADDRESS, that "
                        "cluster's (auto, ray://host:10001); needs pip install 'saebench[ray]'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_sweep(args) -> int:
    from saebench.sweep import load_sweep, run_sweep

    _hide_loading_bars(args.quiet)
    summary = run_sweep(load_sweep(args.sweep), args.output, shard=args.shard, ray_address=args.ray,
                        quiet=args.quiet)
    print(summary.line())
    return 1 if summary.failed else 0


def _cmd_list(args) -> int:
    from tabulate import tabulate

    from saebench.registry import ENCODER_GROUP, available, distribution_of

    if args.what == "models":
        import torch

        from saebench.models import AUTO_DTYPE_RULE, model_presets, resolve_dtype

        rows = [(name, p.get("hub_id", ""), p.get("default_hookpoint", ""), p.get("description", ""))
                for name, p in model_presets().items()]
        print(tabulate(rows, headers=("model", "hub id", "default hookpoint", "description")))
        print("\nAny other Hugging Face causal LM works by hub id or local path.")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"dtype {AUTO_DTYPE_RULE}; on this machine ({device}) auto is {resolve_dtype('auto', device)}.")
    elif args.what == "encoders":
        rows = []
        for name, ep in sorted(available(ENCODER_GROUP).items()):
            dist = distribution_of(ENCODER_GROUP, name)
            rows.append((name, ep.value, f"{dist['distribution']} {dist['version']}"))
        print(tabulate(rows, headers=("encoder", "object", "from")))
        from saebench.encoders.specs import encoder_presets

        if presets := encoder_presets():
            print("\nPresets (each stands for the encoders it lists; '{a,b}' and '{0..11}' expand):")
            print(tabulate([(name, " ".join(p["encoders"]), p.get("description", "")) for name, p in presets.items()],
                           headers=("preset", "encoders", "description"), maxcolwidths=[None, 40, 60]))
    else:
        from saebench.tasks.names import task_names

        print(tabulate(sorted(task_names().items()), headers=("task", "description")))
    return 0


def _cmd_leaderboard(args) -> int:
    from saebench.leaderboard import write_leaderboards

    written = write_leaderboards(args.runs, args.out, task=args.task)
    for path in written:
        print(path)
    return 0


def _cmd_latents(args) -> int:
    from saebench.latents_table import collect, harm_plot, markdown, write_delphi, write_jsonl

    tables = collect(args.runs)
    text = markdown(tables, args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latents.md").write_text(text, encoding="utf-8")
    print(text)
    plot = harm_plot(tables, args.out / "latents_vs_harm.png")
    print(f"saebench: wrote {args.out / 'latents.md'}" + (f" and {plot}" if plot else
          " (no interpretability-vs-harm plot: run lambada on the same SAE to add the harm column)"))
    if args.delphi:
        written = write_delphi(tables, args.delphi)
        print(f"saebench: wrote {len(written)} delphi files under {args.delphi}")
    for path in write_jsonl(tables, args.out):
        print(f"saebench: explanations with their scores (llm_sim explanations=<file>&show_score=...): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saebench.records import SAEBENCH_VERSION

    parser = argparse.ArgumentParser(
        prog="saebench", description="What does a model lose when its activations are replaced by an "
                                     "encoder's reconstruction? Splice, score, compare.")
    parser.add_argument("--version", action="version", version=f"saebench {SAEBENCH_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _sweep_parser(sub)
    p = sub.add_parser("list", help="list encoders, tasks or models", description="List what can be run.")
    p.add_argument("what", choices=("encoders", "tasks", "models"))
    p = sub.add_parser("leaderboard", help="turn records into markdown, CSV and HTML leaderboards with plots",
                       description="One table per set of comparable settings (task and version; model, revision "
                                   "and dtype; the task's parameters; corpus, seed, splice_bos; hookpoints are a "
                                   "column), ranked by the task's headline metric; written as <task>.md, <task>.csv "
                                   "and <task>.html (sortable tables; index.html lists the tasks), with the plots "
                                   "they link and each record's JSON under records/. Files under --runs that are "
                                   "not valid records are named with the reason.")
    p.add_argument("--runs", type=Path, default=Path("saebench_runs"), help="records folder (default ./saebench_runs)")
    p.add_argument("--task", help="only this task")
    p.add_argument("--out", type=Path, default=Path("leaderboards"), help="output folder (default ./leaderboards)")
    p = sub.add_parser("latents", help="one row per latent: explanation scores, llm_sim recall, splice harm",
                       description="Join, per latent of each SAE, the autointerp scores of its explanation, the "
                                   "llm_sim recall and specificity on it (latent_recall) and its frequency-controlled "
                                   "Delta log p when spliced (lambada); Spearman correlations of every pair of columns "
                                   "with bootstrap intervals beside 001's Table 1; a plot of interpretability against "
                                   "harm. Written as latents.md and latents_vs_harm.png under --out.")
    p.add_argument("--runs", type=Path, default=Path("saebench_runs"), help="records folder (default ./saebench_runs)")
    p.add_argument("--out", type=Path, default=Path("latents"), help="output folder (default ./latents)")
    p.add_argument("--rows", type=int, default=30, help="latents shown per table (default 30; all go into the correlations)")
    p.add_argument("--delphi", type=Path, help="also write each autointerp record as delphi's explanations/ and "
                                               "scores/ folders under this folder")
    return parser


def _rank() -> str:
    """' (rank N)' in the messages of a data-parallel run's ranks other than 0 (torchrun / accelerate set RANK)."""
    rank = os.environ.get("RANK", "0")
    return f" (rank {rank})" if rank != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    """Console entry point; user errors print one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"run": _cmd_run, "sweep": _cmd_sweep, "list": _cmd_list, "leaderboard": _cmd_leaderboard,
                "latents": _cmd_latents}
    try:
        return commands[args.command](args)
    except SaebenchError as exc:
        print(f"saebench: error{_rank()}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saebench: interrupted; finished records are kept and a rerun resumes", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
