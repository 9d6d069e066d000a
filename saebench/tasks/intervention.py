"""Intervention scoring (001 §3.5.5; its authors' 2024 code, EleutherAI/delphi@073d180 (then sae-auto-interp),
sae_auto_interp/counterfactuals/pipeline.py and scoring.py): does an explanation of what a latent *does to the
output* become more likely once the latent is turned up?

Per latent, 32-token examples drawn over its activation quantiles are cut after the first token where it fires;
half go to the explainer, half are scored. The latent is steered by adding s times its unit decoder direction to
the hookpoint activation at the prompt's last token only, s calibrated per latent so that the mean
KL(clean || steered) of the next-token distribution over the scoring prompts is `target_kl` (their search: log10 s
in [-3, 4] from 2, log-log interpolation once the target is bracketed, within 10%, at most 10 tries). The
explainer sees, per prompt, the five tokens whose probability rose most and writes what the latent promotes (one
greedy answer; theirs sampled five at T=0.7 and their figures use one at random). For each scoring prompt a
clean and a steered continuation of 8 tokens are sampled (T=1, seeded), and the judge model reads
``<PASSAGE>\\n{prompt}{continuation}\\n\\nThe above passage contains an amplified amount of "{explanation}"``
after saebench's own worked passages. The score is the mean over prompts of NLL(explanation | clean) minus
NLL(explanation | steered), in nats. Baselines, as theirs: the same generations scored with another latent's
explanation (random explanation), and a random unit direction run through the same calibration, explanation and
scoring (random direction).
"""

import math
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saebench.latent_examples import LatentWindows, draw

PASSAGE = '<PASSAGE>\n{text}\n\nThe above passage contains an amplified amount of "'
SHOT_PASSAGES = (("The museum opened a new wing for art from Japan, China and Korea", "East Asia"),
                 ("She counted the boxes: twelve, thirteen, fourteen, 15, 16", "numbers"),
                 ("He said that his brother and his father had left before him", "he/his pronouns"))
EXPLAINER = ("You study one feature of a language model by turning it up at the last token of a text and watching "
             "which next tokens become more likely. For each text you see the tokens whose probability rose most. "
             "Say in a few words what kind of output the feature promotes. Answer with the description only.")
GENERIC_TOKENS = 5


def prompts_of(windows: LatentWindows, latent: int, n: int, seed: int) -> list[list[int]]:
    """`n` examples over the activation quantiles, each cut after the first token where the latent fires
    (examples whose first activation is their first token are left out), in a seeded random order."""
    out = []
    for e in draw(windows.quantiles(latent), max(n, 10), "quantiles", seed + latent):
        first = next(i for i, a in enumerate(e.activations) if a > 0)
        if first >= 1:
            out.append(e.tokens[:first + 1])
    random.Random(seed * 31 + latent).shuffle(out)
    return out[:n]


class Steerer:
    """The subject model with s times a unit direction added at each prompt's last token (saebench.forward)."""

    def __init__(self, forward, direction: Tensor):
        self.forward, self.direction = forward, direction / direction.norm().clamp(min=1e-12)

    def last_logp(self, prompts: list[list[int]], s: float) -> Tensor:
        """(n, vocab) next-token log-probs after each prompt, steered by s (0: clean)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts])
        for i, p in enumerate(prompts):  # right-padded: the padding comes after every position read
            ids[i, :len(p)] = torch.tensor(p)
        with torch.no_grad():
            hidden = self.forward.capture(ids)
            rows = torch.arange(len(prompts))
            hidden[rows, last.to(hidden.device)] += (s * self.direction).to(hidden)
            logits = self.forward.resume(hidden, ids).logits[rows, last.to(hidden.device)]
        return torch.log_softmax(logits.float(), -1).cpu()

    def kl(self, prompts: list[list[int]], s: float, clean: Tensor) -> float:
        steered = self.last_logp(prompts, s)
        return float((clean.exp() * (clean - steered)).sum(-1).clamp(min=0).mean())

    def calibrate(self, prompts: list[list[int]], target: float) -> tuple[float, float]:
        """(s, KL at s): their search over log10 s."""
        clean = self.last_logp(prompts, 0.0)
        lo, hi, x, seen = -3.0, 4.0, 2.0, []
        kl = math.nan
        for _ in range(10):
            kl = self.kl(prompts, 10 ** x, clean)
            seen.append((kl, x))
            if math.isclose(kl, target, rel_tol=0.1):
                break
            lo, hi = (lo, x) if kl > target else (x, hi)
            kls = sorted(seen)
            if kls[0][0] < target < kls[-1][0] and all(k > 0 for k, _ in kls):
                x = float(np.interp(math.log(target), [math.log(k) for k, _ in kls], [v for _, v in kls]))
            else:
                x = (lo + hi) / 2
        return 10 ** seen[-1][1], kl

    def continue_(self, prompt: list[int], s: float, n_new: int, seed: int) -> list[int]:
        """`n_new` tokens sampled at temperature 1 after `prompt`, steered by s at the prompt's last token only."""
        gen = torch.Generator().manual_seed(seed)
        seq = list(prompt)
        for _ in range(n_new):
            ids = torch.tensor([seq])
            with torch.no_grad():
                hidden = self.forward.capture(ids)
                hidden[0, len(prompt) - 1] += (s * self.direction).to(hidden)
                logits = self.forward.resume(hidden, ids).logits[0, -1].float().cpu()
            seq.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
        return seq[len(prompt):]


def explanation_prompt(tokenizer, prompts: list[list[int]], deltas: Tensor):
    """The explainer's prompt: each text and the five tokens whose probability rose most (with the rise)."""
    from saebench.llm import Chat

    parts = []
    for p, d in zip(prompts, deltas):
        top = torch.topk(d, GENERIC_TOKENS)
        rose = ", ".join(f"{tokenizer.decode([int(t)])!r} (+{float(v):.3f})" for v, t in zip(top.values, top.indices))
        parts.append(f"Text: {tokenizer.decode(p)}\nMost increased tokens: {rose}")
    return Chat(EXPLAINER, "\n\n".join(parts))


def score_direction(steerer: Steerer, explain: list[list[int]], scoring: list[list[int]], target_kl: float,
                    n_new: int, seed: int, tokenizer, llm) -> dict[str, Any]:
    """Calibrate, explain and generate for one direction; the generations and explanation to be scored."""
    s, kl = steerer.calibrate(scoring, target_kl)
    deltas = steerer.last_logp(explain, s).exp() - steerer.last_logp(explain, 0.0).exp()
    if llm is None:  # no LLM: the tokens the steering promotes most, on average
        top = torch.topk(deltas.mean(0), 3).indices
        explanation = ", ".join(repr(tokenizer.decode([int(t)])) for t in top)
    else:
        answer = llm.generate([explanation_prompt(tokenizer, explain, deltas)], 20, desc="explaining interventions")[0]
        explanation = (answer or "").strip().splitlines()[0][:200] if answer and answer.strip() else None
    texts = []
    for j, p in enumerate(scoring):
        clean = steerer.continue_(p, 0.0, n_new, seed * 1009 + j)
        steered = steerer.continue_(p, s, n_new, seed * 1009 + j)
        texts.append((tokenizer.decode(p + clean), tokenizer.decode(p + steered)))
    return {"strength": s, "kl": kl, "explanation": explanation, "texts": texts}


def nll_gain(llm, explanation: str, texts: list[tuple[str, str]]) -> tuple[float | None, float | None]:
    """Mean (and standard error) over prompts of NLL(explanation | clean text) - NLL(explanation | steered text)."""
    shots = "".join(PASSAGE.format(text=t) + f'{e}"\n\n' for t, e in SHOT_PASSAGES)
    gains = []
    for clean, steered in texts:
        a = llm.text_logprobs(shots + PASSAGE.format(text=clean), [explanation + '"'], desc="intervention scoring")[0]
        b = llm.text_logprobs(shots + PASSAGE.format(text=steered), [explanation + '"'], desc="intervention scoring")[0]
        if a and b:
            gains.append(sum(b) - sum(a))
    if not gains:
        return None, None
    se = float(np.std(gains, ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else None
    return float(np.mean(gains)), se


def score_latents(forward, W_dec: Tensor, windows: LatentWindows, latents: list[int], tokenizer, llm,
                  n_prompts: int, target_kl: float, n_new: int, seed: int) -> dict[int, dict[str, Any]]:
    """Per latent: intervention_score (± its se over prompts), the random-explanation and random-direction
    baselines, the calibrated strength and KL, and the explanation."""
    runs: dict[int, dict[str, Any]] = {}
    for latent in latents:
        prompts = prompts_of(windows, latent, 2 * n_prompts, seed)
        if len(prompts) < 4:
            continue
        explain, scoring = prompts[:len(prompts) // 2], prompts[len(prompts) // 2:]
        own = score_direction(Steerer(forward, W_dec[latent].float()), explain, scoring, target_kl, n_new, seed,
                              tokenizer, llm)
        g = torch.Generator().manual_seed(seed * 7 + latent)
        random_dir = torch.randn(W_dec.shape[1], generator=g)
        rand = score_direction(Steerer(forward, random_dir), explain, scoring, target_kl, n_new, seed, tokenizer, llm)
        runs[latent] = {"own": own, "random": rand}
    out: dict[int, dict[str, Any]] = {}
    order = list(runs)
    for i, latent in enumerate(order):
        own, rand = runs[latent]["own"], runs[latent]["random"]
        row: dict[str, Any] = {"intervention_strength": own["strength"], "intervention_kl": own["kl"],
                               "intervention_explanation": own["explanation"]}
        if llm is not None and own["explanation"]:
            row["intervention_score"], row["intervention_score_se"] = nll_gain(llm, own["explanation"], own["texts"])
            other = runs[order[(i + 1) % len(order)]]["own"]["explanation"] if len(order) > 1 else None
            row["intervention_random_explanation"] = nll_gain(llm, other, own["texts"])[0] if other else None
            row["intervention_random_direction"] = nll_gain(llm, rand["explanation"], rand["texts"])[0] \
                if rand["explanation"] else None
        out[latent] = row
    return out
