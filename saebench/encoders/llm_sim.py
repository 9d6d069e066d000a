"""``llm_sim:<encoder spec>``: an LLM reads natural-language explanations of an SAE's latents and predicts,
token by token, which latents are active; the SAE's decoder turns the prediction into a reconstruction.

Protocol (after EleutherAI's study of LLM-simulated SAE encoders): at each token, the candidate latents
are every latent the SAE activates there plus `candidates` random inactive ones (or ``candidates=all``).
For each candidate the simulator gets the last 32 tokens of text, the token marked <<like this>>, and
the latent's explanation, and P(active) is read from the log-probs of its answers "1" and "0". The
predicted active set is the candidates with P >= `threshold` (``predict=threshold``) or the |A| most
probable (``predict=top``, |A| the true count). Values:
- ``values=oracle`` (default): each predicted latent gets its true activation, so a false positive gets 0
  and costs nothing: the setting of EleutherAI's KL comparison, which it calls "cheating" (the model "is
  only asked to identify active latents, not their activation values"); it measures which latents are
  found, not what wrongly added ones would do;
- ``values=oracle_fp``: the same, but a false positive gets the latent's median activation in the training
  sample, so false positives cost what they would;
- ``values=predicted``: the simulator's 0-9 value (the mean of its digit distribution) mapped through the
  latent's activation quantiles (q = v/9); a predicted latent whose value answer failed is left out of the
  codes (counted: ``failed_values``).

EleutherAI's study shows each sequence's active latents and 1000 randomly selected inactive ones; the
default `candidates` here is 200, a fifth of the inactive questions per token (the tasks latent_recall
and value_correlation can set their own count: their parameter `candidates`).

Only candidates count: a latent outside them is predicted inactive, which is exactly right for the
inactive latents it stands for only in expectation; the tasks scale counts to the full dictionary.
Failed or unparsed simulator answers are never scored as 0: the candidate is left out of the prediction
and of every metric, and counted (``report()``).

Simulators: an LLM (``llm=<model>``, in process; ``llm_url=`` or ``--llm-url`` for an OpenAI-compatible
server; ``backend=vllm``), or ``llm=rules``: the token-list baseline, which says P(active) = the share of
the token's occurrences in the training sample on which the latent is active, for the latent's listed
tokens, else 0.
"""

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saebench.encoders.base import (
    DECODER_DICTIONARY,
    LATENTS,
    BuildContext,
    Codes,
    EncodeContext,
    Encoder,
    EncoderSpec,
    SparseCodes,
    dense,
)
from saebench.encoders.dictionary import family_options, split_inner
from saebench.encoders.llm_sim_options import (
    ADDED_OPTIONS,
    NEVER_ACTIVE,
    LLMSimConfig,
    check_options,
)
from saebench.errors import SaebenchError
from saebench.records import config_hash
from saebench.capture import LatentSample, latent_sample
from saebench.explanations import (
    WINDOW,
    Explanations,
    generate_explanations,
    load_jsonl,
    marked_window,
    token_explanations,
)
from saebench.simulators import DIGITS, LLMSimulator, Simulator, TokenRuleSimulator

SIMULATES = "simulates"
"""Capability: the encoder predicts latents from text and can show its work (simulate())."""


@dataclass
class Simulation:
    """What the simulator said about each row's candidate latents (lists over rows; ragged)."""

    candidates: list[Tensor]
    """(n_candidates,) latent ids; the truly active ones first."""
    true: list[Tensor]
    """(n_candidates,) the SAE's activation (0: inactive)."""
    p_active: list[Tensor]
    """(n_candidates,) P(active); NaN where the simulator failed."""
    value: list[Tensor | None]
    """(n_candidates,) predicted value on the 0-9 scale (the mean of the digit distribution), NaN where not asked
    or failed; None if never asked."""
    d_latent: int
    skipped_active: list[int] | None = None
    """Per row: truly active latents left out because they have no explanation (missing=skip)."""
    value_probs: list[Tensor | None] | None = None
    """(n_candidates, 10) P(digit) of each value answer, NaN rows where not asked or failed; None if never asked."""

    @classmethod
    def concat(cls, parts: list["Simulation"]) -> "Simulation":
        """The simulations of consecutive chunks of rows as one."""
        skipped = None if any(p.skipped_active is None for p in parts) else [n for p in parts for n in p.skipped_active]
        probs = None if any(p.value_probs is None for p in parts) else [x for p in parts for x in p.value_probs]
        return cls(*([x for p in parts for x in getattr(p, name)] for name in ("candidates", "true", "p_active", "value")),
                   d_latent=parts[0].d_latent, skipped_active=skipped, value_probs=probs)


class LLMSimEncoder(Encoder):
    """Predicts an inner SAE's latents with a simulator reading explanations; decodes with the SAE."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY, SIMULATES})

    def __init__(self, inner: Encoder, cfg: LLMSimConfig, simulator: Simulator, explanations: Explanations,
                 sample: LatentSample, tokenizer, spec: EncoderSpec):
        self.inner, self.cfg, self.simulator, self.explanations = inner, cfg, simulator, explanations
        self.sample, self.tokenizer, self.spec = sample, tokenizer, spec
        self.median = torch.tensor([sample.value_at(i, 0.5) for i in range(sample.d_latent)])
        self.explained = torch.zeros(sample.d_latent, dtype=torch.bool)
        self.explained[list(explanations.texts) + list(explanations.pending)] = True
        self.counts = {"rows": 0, "candidates": 0, "failed_candidates": 0, "failed_values": 0, "skipped_active": 0}
        self.training_context = inner.training_context
        self.data_used = {**(inner.data_used or {}), "latent_sample": sample.key}

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "Encoder":
        inner_spec, options = split_inner(arg)
        cfg = family_options(LLMSimConfig(), options, build, "llm_sim")
        if not inner_spec:
            raise SaebenchError("llm_sim needs the encoder whose latents it simulates: llm_sim:sae:default")
        if build.model is None:
            raise SaebenchError("llm_sim reads text, so it needs a language model; this task runs without one")
        check_options(cfg)
        inner = build.build(inner_spec)
        if LATENTS not in inner.capabilities:
            raise SaebenchError(f"llm_sim simulates latents; {inner.spec.label!r} has none (use e.g. sae:default)")
        d = inner.spec.d_latent
        hookpoint = build.model.hookpoint(inner.spec.hookpoint or build.hookpoint or build.model.default_hookpoint)
        source = cfg.explanations or ("tokens" if cfg.llm == "rules" else "explainer")
        loaded = _load_given(source, cfg, d)  # a bad file or server fails before any model work
        if loaded is not None:
            _check_missing(loaded, d, cfg)
            if cfg.show_score and not any(cfg.show_score in v for v in loaded.scores.values()):
                raise SaebenchError(f"llm_sim option show_score={cfg.show_score!r}: the explanations file gives no "
                                    f"{cfg.show_score!r} score for any latent")
        llm = None if cfg.llm == "rules" else _make_llm(cfg, build)
        sample = latent_sample(build.model, inner, hookpoint, build.cache_dir, build.corpus, build.batch_size,
                               cfg.sample_tokens, progress=build.progress)
        tokenizer = build.model.tokenizer
        if loaded is not None:
            explanations = loaded
        elif source == "tokens":
            explanations = token_explanations(sample, tokenizer)
        else:  # written on demand (Explanations.ensure): by the first simulation, or for the latents a task scores
            how = {} if source == "generate" else {"style": source, "sampling": cfg.explain_sampling,
                                                   "examples": cfg.explain_examples}
            name = config_hash({"sample": sample.key, "explainer": llm.cache_id, **how})
            out = None if build.cache_dir is None else Path(build.cache_dir) / "explanations" / f"{name}.jsonl"
            explanations = generate_explanations(sample, tokenizer, llm, out=out, style=source,
                                                 n_examples=cfg.explain_examples, sampling=cfg.explain_sampling,
                                                 seed=cfg.seed)
            if out is not None and build.progress:
                print(f"saebench: explanations of {inner.spec.label} by {llm.label} are kept in {out}")
        if cfg.llm == "rules":
            if explanations.tokens is None:
                raise SaebenchError("llm=rules matches token lists: use it with explanations=tokens")
            simulator: Simulator = TokenRuleSimulator(sample, explanations)
        else:
            simulator = LLMSimulator(llm, explanations, cfg.show_score)
        never = (sample.count() == 0).nonzero().squeeze(1).tolist()
        if source in ("generate", "explainer", "tokens"):  # latents the sample never saw active: nothing to explain them by
            explanations.texts.update({i: NEVER_ACTIVE for i in never if i not in explanations.texts})
        missing = _check_missing(explanations, d, cfg)
        spec = EncoderSpec("llm_sim", arg, inner.spec.hookpoint, inner.spec.d_in, d, {
            "inner": inner.spec.to_dict(), "options": {  # options added later are left out at their defaults
                k: v for k, v in vars(cfg).items() if k not in ("concurrency", "timeout", "retries")
                and ADDED_OPTIONS.get(k, object()) != v},
            "simulator": simulator.label, "explanations": explanations.source,
            "display": {"simulator": simulator.label, "explanations": explanations.source},
            "unexplained": len(missing), "never_active_in_sample": len(never)})
        return cls(inner, cfg, simulator, explanations, sample, tokenizer, spec)

    @property
    def W_dec(self) -> Tensor:
        return self.inner.W_dec

    def explain_all(self) -> None:
        """Write every explanation still pending (a simulation may ask about any latent); a latent whose
        explanation failed is an error with missing=error, else left out like any unexplained one."""
        if not self.explanations.pending:
            return
        self.explanations.ensure(self.explanations.pending)
        if self.explanations.failed:
            _check_missing(self.explanations, self.spec.d_latent, self.cfg)
            self.explained[sorted(self.explanations.failed)] = False

    def _candidates(self, active: Tensor, seed: int, candidates: str) -> Tensor:
        d = self.spec.d_latent
        if candidates == "all":
            rest = torch.ones(d, dtype=torch.bool)
            rest[active] = False
            pool = rest.nonzero().squeeze(1)
        else:
            gen = torch.Generator().manual_seed(seed)
            n = min(int(candidates), d - len(active))
            pool = torch.empty(0, dtype=torch.long)
            taken = torch.zeros(d, dtype=torch.bool)
            taken[active] = True
            while len(pool) < n:  # rejection sampling: active latents are few
                draw = torch.randint(0, d, (2 * (n - len(pool)) + 8,), generator=gen)
                draw = draw[~taken[draw]].unique(sorted=False)
                draw = draw[torch.randperm(len(draw), generator=gen)][:n - len(pool)]
                taken[draw] = True
                pool = torch.cat([pool, draw])
        cand = torch.cat([active, pool])
        return cand[self.explained[cand]] if self.cfg.missing == "skip" else cand

    def simulate(self, acts: Tensor, context: EncodeContext, values: str | None = None, candidates: str | None = None,
                 value_prompt: str = "default") -> Simulation:
        """The simulator's predictions for each row's candidates, and 0-9 values of the truly active candidates
        (`values`='active') or of the predicted active ones ('predicted'); None: no values.

        Args:
            candidates: inactive candidates per row ('all' or a count); None: the encoder's option.
            value_prompt: which simulators.VALUE_PROMPTS entry asks the values.
        """
        if not context.has_text:
            raise SaebenchError("llm_sim reads the text of each token, which this task does not pass")
        self.explain_all()
        with torch.no_grad():
            true = dense(self.inner.encode(acts, context)).float().cpu()
        queries, cands, trues, skipped = [], [], [], []
        for row in range(len(acts)):
            active = true[row].nonzero().squeeze(1)
            prefix = context.prefix(row, WINDOW).cpu()
            text = marked_window(self.tokenizer, prefix, len(prefix), {len(prefix) - 1}, 0)
            seed = zlib.crc32(f"{self.cfg.seed}:{prefix.tolist()}".encode())
            cand = self._candidates(active, seed, self.cfg.candidates if candidates is None else candidates)
            skipped.append(len(active) - int(self.explained[active].sum()) if self.cfg.missing == "skip" else 0)
            cands.append(cand)
            trues.append(true[row, cand])
            queries.append([(text, int(prefix[-1]), int(c)) for c in cand])
        flat = [q for qs in queries for q in qs]
        p_flat = self.simulator.p_active(flat)
        probs = _split([float("nan") if p is None else p for p in p_flat], [len(c) for c in cands])
        sim = Simulation(cands, trues, probs, [None] * len(cands), self.spec.d_latent, skipped)
        if values:
            sim.value, sim.value_probs = self._values(sim, queries, values, value_prompt)
        self.counts["rows"] += len(acts)
        self.counts["candidates"] += len(flat)
        self.counts["failed_candidates"] += sum(p is None for p in p_flat)
        self.counts["skipped_active"] += sum(skipped)
        return sim

    def _values(self, sim: Simulation, queries, which: str, prompt: str) -> tuple[list[Tensor], list[Tensor]]:
        """Per row: (n_candidates,) mean value and (n_candidates, 10) digit probabilities, NaN where not asked."""
        wanted = [t > 0 if which == "active" else self.predicted(sim, i) for i, t in enumerate(sim.true)]
        asked = [q for qs, w in zip(queries, wanted) for q, keep in zip(qs, w.tolist()) if keep]
        answers = self.simulator.value_probs(asked, prompt)
        self.counts["failed_values"] += sum(a is None for a in answers)
        it = iter(answers)
        means, probs = [], []
        for w in wanted:
            p = torch.full((len(w), len(DIGITS)), float("nan"))
            for j in w.nonzero().squeeze(1).tolist():
                a = next(it)
                if a is not None:
                    p[j] = torch.tensor(a, dtype=torch.float32)
            means.append((p * torch.arange(len(DIGITS))).sum(1))  # NaN rows stay NaN
            probs.append(p)
        return means, probs

    def predicted(self, sim: Simulation, row: int) -> Tensor:
        """(n_candidates,) bool: the candidates predicted active in `row` (failed answers never are)."""
        p = sim.p_active[row]
        ok = ~p.isnan()
        if self.cfg.predict == "top":
            k = int((sim.true[row] > 0).sum())
            order = torch.where(ok, p, torch.full_like(p, -1.0)).argsort(descending=True)[:k]
            out = torch.zeros_like(ok)
            out[order] = True
            return out & ok
        return ok & (p >= self.cfg.threshold)

    @property
    def code_values(self) -> str | None:
        """What simulate() must also ask for codes_of() to work: 'predicted' values, or None."""
        return "predicted" if self.cfg.values == "predicted" else None

    def codes_of(self, sim: Simulation) -> SparseCodes:
        """The predicted codes of every row, valued as option `values` says (see the module docstring); a
        simulation made with values=self.code_values."""
        rows = []
        for i in range(len(sim.candidates)):
            keep = self.predicted(sim, i)
            latents = sim.candidates[i][keep]
            true = sim.true[i][keep]
            if self.cfg.values == "predicted":
                v = sim.value[i][keep]
                answered = ~v.isnan()  # a failed value answer is missing, never a value: the latent is left out
                latents, v = latents[answered], v[answered]
                vals = torch.tensor([self.sample.value_at(int(l), float(x) / 9) for l, x in zip(latents, v)])
            elif self.cfg.values == "oracle_fp":
                vals = torch.where(true > 0, true, self.median[latents])
            else:
                vals = true
            rows.append((latents, vals))
        k = max([len(l) for l, _ in rows] + [1])
        idx = torch.zeros(len(rows), k, dtype=torch.long)
        val = torch.zeros(len(rows), k)
        for i, (l, v) in enumerate(rows):
            idx[i, :len(l)], val[i, :len(v)] = l, v
        return SparseCodes(idx, val, self.spec.d_latent)

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        codes = self.codes_of(self.simulate(acts, context, values=self.code_values))
        return SparseCodes(codes.indices.to(acts.device), codes.values.to(acts.device), codes.d_latent)

    def decode(self, codes: Codes) -> Tensor:
        return self.inner.decode(codes)

    def report(self) -> dict[str, Any]:
        return {"simulator": self.simulator.label, "explanations": self.explanations.source, **self.counts,
                **self.simulator.report()}


def _check_missing(explanations: Explanations, d_latent: int, cfg: LLMSimConfig) -> list[int]:
    """The unexplained latents; one clear error when there are some and missing=error."""
    missing = explanations.missing(d_latent)
    if missing and cfg.missing == "error":
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise SaebenchError(f"explanations {explanations.source} lack {len(missing)} of the {d_latent} latents "
                            f"({shown}); add them, or pass missing=skip to leave those latents out (the record "
                            "counts them)")
    return missing


def _load_given(source: str, cfg: LLMSimConfig, d_latent: int) -> Explanations | None:
    if source in ("generate", "explainer", "tokens"):
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        from saebench.explanations import load_delphi

        return load_delphi(path, d_latent, cfg.delphi_module or None)
    return load_jsonl(path, d_latent)


def _make_llm(cfg: LLMSimConfig, build: BuildContext):
    from saebench.llm import LLMSettings, make_llm

    settings = LLMSettings(cfg.llm, cfg.backend, cfg.llm_url, cfg.concurrency, cfg.timeout, cfg.retries)
    return make_llm(settings, build.progress)


def _split(values: list[float], sizes: list[int]) -> list[Tensor]:
    out, start = [], 0
    for n in sizes:
        out.append(torch.tensor(values[start:start + n], dtype=torch.float32))
        start += n
    return out
