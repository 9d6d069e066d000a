"""Write tests/data/delphi_run/ with EleutherAI delphi's own code, as `delphi` would write a run folder.

The explanation and score files come from delphi's real objects: ``Latent``/``LatentRecord`` and the
examples (delphi/latents/latents.py), the detection and fuzz scorers run end to end with a scripted LLM client
(answers with log-probabilities, without, unparseable, and a failed call, so predictions and probabilities
include None), the surprisal and embedding scorers with their model calls replaced by fixed numbers, and the
files written by ``explainer_postprocess`` / ``scorer_postprocess`` compiled from delphi/__main__.py itself.
tests/unit/test_delphi_files.py checks that saebench.delphi_files reads and rewrites them byte for byte.

Usage (fixtures committed from delphi 0.1.1, commit 3c2e139378b56ca02a632697b541a11aebf03855):
    git -C <delphi mirror> archive HEAD | tar -x -C /tmp/delphi_src
    python benchmarks/make_delphi_fixtures.py [/tmp/delphi_src] [--out tests/data/delphi_run]
"""

import argparse
import ast
import asyncio
import importlib
import importlib.util
import logging
import random
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import orjson
import torch

MODULE = "layers.3.mlp"
EXPLANATIONS = {
    0: 'Quotation marks: "double", \'single\' and “curly” ones',
    7: "Naïve café words — an em dash, 日本語 and an emoji 🙂",
    42: "A backslash \\ and a tab\there, then a line\nbreak",
}
TOKENS = [" The", " “quoted”", " naïve", " 日本", '"x"', "\n"]
ACTIVATIONS = [0.0, 0.1, 1e-7, 3.0, 0.5, 0.0]  # float32 in delphi's cache, widened by .tolist()


def load_delphi(src: Path) -> SimpleNamespace:
    """Import the delphi classes the files come from, from an extracted source tree.

    delphi's package __init__s import every backend at import time: delphi.latents pulls faiss and
    sentence_transformers (constructors), delphi.scorers and delphi.clients pull vllm (offline client),
    delphi.explainers too; none is installed here, and none is used by the classes below. So those four
    packages are registered as empty packages (their __init__ not run) and the needed submodules imported
    from them. blobfile (LatentRecord.save) and aiofiles (explanation loaders) are used only inside functions
    this script never calls, so they are stubbed when missing.
    """
    sys.path.insert(0, str(src))
    for name in ("blobfile", "aiofiles"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    import delphi  # its own __init__ is light: a version and a logger

    for package in ("latents", "scorers", "clients", "explainers"):
        stub = types.ModuleType(f"delphi.{package}")
        stub.__path__ = [str(src / "delphi" / package)]
        sys.modules[stub.__name__] = stub
        setattr(delphi, package, stub)
    latents = importlib.import_module("delphi.latents.latents")
    for name in ("Latent", "LatentRecord", "Example", "ActivatingExample", "NonActivatingExample"):
        setattr(delphi.latents, name, getattr(latents, name))  # what `from ...latents import X` asks for

    def load(name: str) -> types.ModuleType:
        return importlib.import_module(f"delphi.{name}")

    return SimpleNamespace(
        version=delphi.__version__, latents=latents, client=load("clients.client"),
        explainer=load("explainers.explainer"), detection=load("scorers.classifier.detection"),
        fuzz=load("scorers.classifier.fuzz"), surprisal=load("scorers.surprisal.surprisal"),
        embedding=load("scorers.embedding.embedding"))


def postprocessors(src: Path, explanations_path: Path):
    """delphi's explainer_postprocess and scorer_postprocess, compiled from the source of delphi/__main__.py.

    They are closures inside process_cache (which needs a model and a latent cache), so their definitions are
    taken out of the syntax tree unchanged and `explanations_path` given as a global.
    """
    main = src / "delphi" / "__main__.py"
    wanted = ("explainer_postprocess", "scorer_postprocess")
    nodes = [n for n in ast.walk(ast.parse(main.read_text())) if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if sorted(n.name for n in nodes) != sorted(wanted):
        sys.exit(f"{main} no longer defines {wanted} once each; update this script")
    namespace = {"orjson": orjson, "explanations_path": explanations_path}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(main), "exec"), namespace)
    return namespace["explainer_postprocess"], namespace["scorer_postprocess"]


def records(d) -> list:
    """One LatentRecord per latent: two activating test examples (quantiles 0 and 1), one random
    non-activating example (distance -1.0, as delphi's random_non_activating_windows)."""
    out = []
    for shift, latent in enumerate(EXPLANATIONS):
        tokens = TOKENS[shift:] + TOKENS[:shift]
        test = [d.latents.ActivatingExample(
            tokens=torch.arange(len(tokens)), activations=torch.tensor(ACTIVATIONS, dtype=torch.float32) / (q + 1),
            str_tokens=tokens, quantile=q) for q in (0, 1)]
        not_active = [d.latents.NonActivatingExample(
            tokens=torch.arange(len(tokens)), activations=torch.zeros(len(tokens)), str_tokens=tokens[::-1],
            distance=-1.0)]
        record = d.latents.LatentRecord(d.latents.Latent(MODULE, latent), test=test, not_active=not_active)
        # delphi's scorer_preprocess
        record.explanation = EXPLANATIONS[latent]
        record.extra_examples = record.not_active
        out.append(record)
    return out


def scripted_client(d):
    """A delphi Client that answers each one-example prompt in turn from a fixed script."""

    def logprobs(p1: float, p0: float) -> list:
        top = [SimpleNamespace(token="1", logprob=p1), SimpleNamespace(token="0", logprob=p0)]
        return [SimpleNamespace(token="[", top_logprobs=[]), SimpleNamespace(token="1", top_logprobs=top),
                SimpleNamespace(token="]", top_logprobs=[])]

    script = [d.client.Response("[1]", logprobs=logprobs(-0.1, -2.3)),
              d.client.Response("[0]", logprobs=logprobs(-3.0, -0.05)),
              d.client.Response("[1]"),  # no log-probabilities: probability None
              RuntimeError("scripted failure"),  # delphi logs it: prediction, probability, correct None
              d.client.Response("no brackets here")]  # unparseable: all None too

    class ScriptedClient(d.client.Client):
        def __init__(self):
            super().__init__("scripted")
            self.calls = 0

        async def generate(self, prompt, **kwargs):
            answer = script[self.calls % len(script)]
            self.calls += 1
            if isinstance(answer, Exception):
                raise answer
            return answer

    return ScriptedClient()


class FixedEmbedder:
    """Stands in for the SentenceTransformer: a text's embedding is a few character counts."""

    def encode(self, text):
        def embed(t: str) -> list[float]:
            return [len(t), sum(c in "aeiou" for c in t), sum(not c.isascii() for c in t) + 1.0]

        return torch.tensor(embed(text) if isinstance(text, str) else [embed(t) for t in text])

    def similarity(self, query, samples):
        return torch.nn.functional.cosine_similarity(query[None], samples)[None]


def fixed_losses(explanation: str, samples: list, batch_size: int = 10) -> list[list[float]]:
    """Stands in for SurprisalScorer.compute_loss_with_kv_cache: per-token losses that depend on the prompt."""
    scale = 1.0 if "Various unrelated" in explanation else 0.5
    return [[3.0 * scale, 0.1, 1e-7, float(torch.tensor(scale / (i + 3), dtype=torch.float32))]
            for i in range(len(samples))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, default=Path("/tmp/delphi_src"),
                        help="an extracted copy of delphi's repository (holds delphi/__main__.py)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/delphi_run")
    args = parser.parse_args()
    if not (args.src / "delphi" / "__main__.py").is_file():
        sys.exit(f"{args.src} is not an extracted delphi repository (no delphi/__main__.py)")
    logging.getLogger("delphi").setLevel(logging.CRITICAL)  # the scripted failures are logged as errors
    d = load_delphi(args.src)

    for sub in ("explanations", "scores"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    explanations_path, scores_path = args.out / "explanations", args.out / "scores"
    explanations_path.mkdir(parents=True)  # as process_cache does
    explainer_postprocess, scorer_postprocess = postprocessors(args.src, explanations_path)

    random.seed(0)  # the surprisal and embedding scorers shuffle with the global generator
    surprisal = d.surprisal.SurprisalScorer(model=None, verbose=False, batch_size=10)
    surprisal.compute_loss_with_kv_cache = fixed_losses
    scorers = [d.detection.DetectionScorer(scripted_client(d), n_examples_shown=1, log_prob=True),
               d.fuzz.FuzzingScorer(scripted_client(d), n_examples_shown=1, log_prob=True),
               surprisal, d.embedding.EmbeddingScorer(FixedEmbedder())]
    for record in records(d):
        explainer_postprocess(d.explainer.ExplainerResult(record=record, explanation=record.explanation))
        for scorer in scorers:
            score_dir = scores_path / scorer.name
            score_dir.mkdir(parents=True, exist_ok=True)
            scorer_postprocess(asyncio.run(scorer(record)), score_dir=score_dir)

    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"delphi {d.version}: wrote {len(files)} files, {size} bytes under {args.out}")


if __name__ == "__main__":
    main()
