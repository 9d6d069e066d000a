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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saebench.capture import LatentSample
from saebench.delphi_files import read_explanations
from saebench.errors import SaebenchError
from saebench.llm import LLM, Chat
from saebench.records import write_atomic

WINDOW = 32
"""Tokens per text window shown to the explainer and the simulator."""


@dataclass
class Explanations:
    """One explanation per latent (some may be missing), and where they come from."""

    texts: dict[int, str]
    source: str
    """For records: 'file:<name>#<sha256[:12]>', 'delphi:<folder>', 'generate:<llm>' or 'tokens'."""
    tokens: dict[int, list[int]] | None = None
    """The token-list baseline's tokens per latent (explanations=tokens)."""

    def missing(self, d_latent: int) -> list[int]:
        return [i for i in range(d_latent) if i not in self.texts]


def load_jsonl(path: Path, d_latent: int) -> Explanations:
    """Explanations from a JSONL file of {"latent": int, "explanation": str, "scores": optional}; a malformed
    line, a duplicate, or a latent outside [0, d_latent) is one clear error naming the line."""
    if not path.is_file():
        raise SaebenchError(f"explanations file {str(path)!r} does not exist")
    texts: dict[int, str] = {}
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
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return Explanations(texts, f"file:{path.name}#{digest}")


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
                          out: Path | None = None) -> Explanations:
    """Explain every latent active in the sample with `llm` (answers cached); latents never active in the
    sample stay unexplained. Writes the explanations as JSONL to `out` when given."""
    latents = [i for i in range(sample.d_latent) if int(sample.count()[i]) > 0]
    answers = llm.generate(explainer_prompts(sample, tokenizer, latents), max_tokens, desc="explaining latents")
    texts = {latent: _first_sentence(a) for latent, a in zip(latents, answers) if a}
    if out is not None:
        write_atomic(out, "".join(json.dumps({"latent": k, "explanation": v}) + "\n" for k, v in sorted(texts.items())))
    return Explanations(texts, f"generate:{llm.label}")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:300]
