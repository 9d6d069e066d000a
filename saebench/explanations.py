"""Natural-language explanations of an encoder's latents: loaded, generated, or a token-list baseline.

Sources (``llm_sim`` option ``explanations=``):
- a JSONL file, one ``{"latent": int, "explanation": str, "scores": {...}}`` per line (scores optional);
- a folder of delphi's output (``explanations/`` as delphi writes it, see `load_delphi`);
- ``generate``: saebench's explainer. For each latent, its top-activating and quantile-sampled 32-token
  windows from the corpus's training split, activating tokens marked <<like this>>, are shown to an LLM
  that answers with a one-sentence explanation (Bills et al. 2023; Paulo et al. 2024, "Automatically
  Interpreting Millions of Features in Large Language Models"). Answers are cached on disk.
- ``tokens``: no LLM. The explanation is the latent's most frequent activating tokens; the rule simulator
  (saebench.encoders.llm_sim) matches them, a cheap reference row for every leaderboard.

Everything is drawn from `saebench.capture.LatentSample`: how the latents fire on a sample of the corpus's
training split, computed once per (encoder, model, hookpoint, corpus) and cached.
"""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saebench.capture import LatentSample
from saebench.delphi_files import read_explanations
from saebench.errors import SaebenchError
from saebench.latent_examples import LatentWindows, draw
from saebench.llm import LLM, Chat
from saebench.records import write_atomic

WINDOW = 32
"""Tokens per text window shown to the explainer and the simulator."""


@dataclass
class Explanations:
    """One explanation per latent (some may be missing), and where they come from.

    Generated explanations are written on demand: `pending` latents are explained by `explain` when `ensure`
    asks for them (a task scoring 100 latents asks an LLM about those 100, not the whole dictionary)."""

    texts: dict[int, str]
    source: str
    """For records: 'file:<name>#<sha256[:12]>', 'delphi:<folder>', 'generate:<llm>', 'explainer...:<llm>' or
    'tokens'."""
    tokens: dict[int, list[int]] | None = None
    """The token-list baseline's tokens per latent (explanations=tokens)."""
    pending: set[int] = field(default_factory=set)
    """Latents that can be explained and are not yet."""
    explain: Callable[[list[int]], dict[int, str]] | None = None
    failed: set[int] = field(default_factory=set)
    """Latents whose explainer answer failed (counted by the LLM; left unexplained)."""
    scores: dict[int, dict[str, float]] = field(default_factory=dict)
    """Scores of each explanation given with it (a JSONL file's "scores", e.g. {"fuzzing": 0.8})."""

    def missing(self, d_latent: int) -> list[int]:
        return [i for i in range(d_latent) if i not in self.texts and i not in self.pending]

    def ensure(self, latents) -> None:
        """Explain those of `latents` still pending (one batch of LLM prompts)."""
        todo = sorted(set(int(l) for l in latents) & self.pending)
        if todo:
            got = self.explain(todo)
            self.texts.update(got)
            self.failed |= set(todo) - set(got)
            self.pending -= set(todo)


def load_jsonl(path: Path, d_latent: int) -> Explanations:
    """Explanations from a JSONL file of {"latent": int, "explanation": str, "scores": optional}; a malformed
    line, a duplicate, or a latent outside [0, d_latent) is one clear error naming the line."""
    if not path.is_file():
        raise SaebenchError(f"explanations file {str(path)!r} does not exist")
    texts: dict[int, str] = {}
    scores: dict[int, dict[str, float]] = {}
    raw = path.read_bytes()
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"explanations file {path.name!r} line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SaebenchError(f"{where} is not JSON ({exc.msg}); each line must be "
                                '{"latent": <int>, "explanation": "<text>"}') from None
        latent, text = (item.get("latent"), item.get("explanation")) if isinstance(item, dict) else (None, None)
        if not isinstance(latent, int) or isinstance(latent, bool) or not isinstance(text, str):
            raise SaebenchError(f'{where} needs an integer "latent" and a string "explanation"')
        if not 0 <= latent < d_latent:
            raise SaebenchError(f"{where}: latent {latent} is outside the encoder's {d_latent} latents (0..{d_latent - 1})")
        if latent in texts:
            raise SaebenchError(f"{where}: latent {latent} is explained twice")
        texts[latent] = text.strip()
        given = item.get("scores") or {}
        if not isinstance(given, dict):
            raise SaebenchError(f'{where}: "scores" must be an object of numbers, e.g. {{"fuzzing": 0.8}}')
        scores[latent] = {k: float(v) for k, v in given.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return Explanations(texts, f"file:{path.name}#{digest}", scores=scores)


def load_delphi(path: Path, d_latent: int, module: str | None = None) -> Explanations:
    """Explanations as EleutherAI's delphi writes them (saebench.delphi_files): `path` is the run folder or its
    explanations/ folder; `module` picks one module when the folder holds several."""
    module, texts = read_explanations(path, module)
    for latent in texts:
        if latent >= d_latent:
            raise SaebenchError(f"delphi explanation {module}_latent{latent}.txt: latent {latent} is outside the "
                                f"encoder's {d_latent} latents (0..{d_latent - 1})")
    folder = path / "explanations" if (path / "explanations").is_dir() else path
    name = folder.parent.name if folder.name == "explanations" else folder.name
    return Explanations({k: v.strip() for k, v in texts.items()}, f"delphi:{name}/{module}")


def token_explanations(sample: LatentSample, tokenizer, n_tokens: int = 10) -> Explanations:
    """The baseline: each latent's `n_tokens` most frequent activating tokens in the sample."""
    flat = sample.tokens.reshape(-1)
    texts, tokens = {}, {}
    for latent in range(sample.d_latent):
        rows, _ = sample.of(latent)
        if len(rows) == 0:
            continue
        ids, counts = torch.unique(flat[rows], return_counts=True)
        top = ids[torch.argsort(counts, descending=True, stable=True)[:n_tokens]].tolist()
        tokens[latent] = top
        texts[latent] = "Active on the tokens " + ", ".join(repr(tokenizer.decode([t])) for t in top)
    return Explanations(texts, "tokens", tokens)


def marked_window(tokenizer, seq: Tensor, end: int, active: set[int], start: int | None = None) -> str:
    """Text of seq[start:end] on one line, the tokens at positions in `active` marked <<like this>> (a run of
    marked tokens is marked once)."""
    start = max(1, end - WINDOW) if start is None else start  # position 0 is BOS
    parts = []
    for p in range(start, end):
        piece = tokenizer.decode([int(seq[p])]).replace("\n", " ")
        if p in active:
            piece = piece if p - 1 in active and p > start else "<<" + piece
            piece = piece if p + 1 in active and p + 1 < end else piece + ">>"
        parts.append(piece)
    return "".join(parts)


EXPLAINER_SYSTEM = (
    "You study one feature of a language model. You will see text excerpts in which the tokens where the "
    "feature is active are marked <<like this>>. Excerpts are ordered from the strongest activations to "
    "weaker ones. Write one short sentence saying what the feature responds to: which tokens, in what "
    "context. Do not mention the markers. Answer with the sentence only.")


def explainer_prompts(sample: LatentSample, tokenizer, latents: list[int], n_top: int = 5,
                      n_sampled: int = 5):
    """The explainer's prompt for each latent: its top and quantile-sampled windows, activating tokens marked."""
    length = sample.tokens.shape[1]
    prompts = []
    for latent in latents:
        rows, _ = sample.of(latent)
        picks = list(range(min(n_top, len(rows))))
        if len(rows) > n_top:  # evenly spread over the rest, weakest last
            extra = torch.linspace(n_top, len(rows) - 1, min(n_sampled, len(rows) - n_top)).round().long().tolist()
            picks += [i for i in dict.fromkeys(extra) if i not in picks]
        active = set(rows.tolist())
        lines = []
        for i in picks:
            r = int(rows[i])
            ctx_i, pos = divmod(r, length)
            seq = sample.tokens[ctx_i]
            end = min(length, pos + 8)
            window = range(max(1, end - WINDOW), end)
            marks = {p for p in window if ctx_i * length + p in active}
            lines.append(f"{len(lines) + 1}. {marked_window(tokenizer, seq, end, marks, window.start)}")
        prompts.append(Chat(EXPLAINER_SYSTEM, "Excerpts:\n" + "\n".join(lines) + "\n\nWhat does the feature respond to?"))
    return prompts


def generate_explanations(sample: LatentSample, tokenizer, llm: LLM, max_tokens: int = 40,
                          out: Path | None = None, style: str = "generate", n_examples: int = 40,
                          sampling: str = "quantiles", seed: int = 0) -> Explanations:
    """Explanations `llm` writes for the latents active in the sample, on demand (Explanations.ensure; answers
    cached); latents never active in the sample stay unexplained. `style` 'generate' is saebench's first
    explainer (explainer_prompts); 'explainer' follows 001 (explainer_prompts_001, `n_examples` drawn by
    `sampling`). Every explanation written so far is kept as JSONL in `out` when given."""
    latents = {i for i in range(sample.d_latent) if int(sample.count()[i]) > 0}
    explanations = Explanations({}, f"generate:{llm.label}" if style == "generate" else
                                f"explainer({sampling},{n_examples}):{llm.label}", pending=latents)
    windows = LatentWindows(sample, tokenizer) if style == "explainer" else None

    def explain(todo: list[int]) -> dict[int, str]:
        if windows is None:
            prompts, budget = explainer_prompts(sample, tokenizer, todo), max_tokens
        else:  # 001's answer reasons first and ends with its 'Explanation:' line
            prompts, budget = explainer_prompts_001(windows, todo, n_examples, sampling, seed), max(max_tokens, 60)
        answers = llm.generate(prompts, budget, desc="explaining latents")
        got = {latent: (_first_sentence(a) if windows is None else _explanation_line(a))
               for latent, a in zip(todo, answers) if a}
        got = {k: v for k, v in got.items() if v}
        if out is not None:
            done = {**explanations.texts, **got}
            write_atomic(out, "".join(json.dumps({"latent": k, "explanation": v}) + "\n" for k, v in sorted(done.items())))
        return got

    explanations.explain = explain
    return explanations


EXPLAINER_001_SYSTEM = (
    "You are a meticulous researcher looking for the pattern behind one feature of a language model. You get "
    "text excerpts; in each, the tokens where the feature is active are marked <<like this>> (a run of active "
    "tokens is marked as one), and the line after it lists the marked tokens with how strongly the feature is "
    "active on each, from 1 to 10. Describe concisely what the feature responds to: the tokens and the context "
    "around them that the excerpts share. Do not mention the markers and do not list examples. End with one "
    "line: Explanation: <your description>")
EXPLAINER_001_SHOT = (
    "Excerpt 1: The treaty was signed in <<1648>>, ending the war.\nActivations: (\"1648\": 10)\n"
    "Excerpt 2: Between <<1914>> and <<1918>> the town lost half its men.\nActivations: (\" 1914\": 9), "
    "(\" 1918\": 7)\nExcerpt 3: Her first album came out in <<2003>>.\nActivations: (\" 2003\": 4)",
    "The excerpts mark four-digit numbers that are years, most strongly in historical dates.\n"
    "Explanation: Years written as four digits, especially dates of historical events.")


def explainer_prompts_001(windows: LatentWindows, latents: list[int], n_examples: int = 40,
                          sampling: str = "quantiles", seed: int = 0) -> list[Chat]:
    """001's explainer prompt (delphi's default explainer, in saebench's words): `n_examples` activating
    32-token examples drawn by `sampling` (default: ten activation quantiles), the tokens at >= 0.3 of the
    example's largest activation marked, each followed by the marked tokens' activations on a 0-10 scale of
    the latent's largest (delphi shows at most ~10 per example; so does this)."""
    prompts = []
    for latent in latents:
        quantiles = windows.quantiles(latent)
        if not any(quantiles):  # fewer than ten activating windows: take what there is
            ids, acts = windows.activations(latent)
            quantiles = [[windows.example(int(w), a, 0) for w, a in zip(ids, acts)]]
        examples = draw(quantiles, n_examples, sampling if any(len(q) for q in quantiles[1:]) else "top",
                        seed + latent)
        top = max(max(e.activations) for q in quantiles for e in q[:1]) if quantiles[0] else 1.0
        lines = []
        for i, e in enumerate(examples):
            scale = [min(10, max(0, -int(-10 * a // max(top, 1e-6)))) for a in e.activations]
            strong = [j for j, a in enumerate(e.activations) if a >= 0.3 * max(e.activations)][:11]
            acts = ", ".join(f"({json.dumps(e.str_tokens[j])}: {scale[j]})" for j in strong)
            lines.append(f"Excerpt {i + 1}: {e.highlighted()}\nActivations: {acts}")
        prompts.append(Chat(EXPLAINER_001_SYSTEM, "\n".join(lines), (EXPLAINER_001_SHOT,)))
    return prompts


def _explanation_line(text: str) -> str:
    """The text after the last 'Explanation:' of an answer, else its first sentence."""
    found = re.findall(r"Explanation:\s*(.+)", text)
    return " ".join(found[-1].split())[:300] if found else _first_sentence(text)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:300]
