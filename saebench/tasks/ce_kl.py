"""CE / KL recovery: what the model loses when the hookpoint is replaced by a reconstruction.

The standard SAE fidelity scores (Bricken et al. 2023, "Towards Monosemanticity"; SAELens
run_evals): cross-entropy with the reconstruction spliced in, normalised between the clean
model (1) and zero- or mean-ablation of the hookpoint (0), and the KL divergence from the
clean model's next-token distribution. Alongside: reconstruction error and sparsity.

Populations (every average excludes attention sinks: position 0 and BOS tokens):
- CE and KL metrics average over next-token predictions made at non-sink positions whose
  target is not BOS (predicting a document boundary is not language modelling).
- Activation metrics (fve, nmse, mse, cos, l0, l1, densities) average over non-sink positions.

Each encoder with latents also leaves every latent's firing frequency over the scored tokens in its
record's details (curve "density"), which leaderboards draw as a histogram of log10 frequency, the
view of feature densities Anthropic's circuits update compares TopK, Gated and vanilla SAEs by.

Ablations use the same splice as encoders, so zero and mean ablation also leave the sinks
untouched. sae-lens's run_evals differs here by definition: its zero ablation zeroes BOS too,
which makes its ce_zero lower and its ce_loss_recovered smaller; it also scores predictions
whose target is BOS and averages in bf16. benchmarks/vs_saelens.py measures each difference.

Work done (benchmarks/ce_kl_cost.py measures it): the layers below the hookpoint run once per
context; the clean, zero and mean passes and every encoder's pass run only the layers above it
(saebench.forward); an exact reconstruction reuses the clean pass; the clean, zero and mean
results are kept in the reference cache (saebench.tasks.reference), so a later run on the same
data costs one pass per new encoder plus the LM head for the clean distribution.
"""

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saebench.encoders.base import Encoder
from saebench.encoders.baselines import MeanEncoder, ZeroEncoder
from saebench.errors import SaebenchError
from saebench.forward import LMHead
from saebench.models import cache_dir
from saebench.splice import sink_mask, splice_activations
from saebench.stats import ratio_and_se, sum_by_row
from saebench.tasks.base import (
    MetricSpec,
    Row,
    Task,
    TaskContext,
    TaskResult,
    TaskSpec,
    checkpointed_batches,
    row_key,
)
from saebench.tasks.ce_kl_joint import joint_parts, joint_row, run_joint
from saebench.tasks.ce_kl_sums import (
    CLEAN_SUMS,
    DENSITY_CURVE,
    PassSums,
    add_clean_sums,
    density_rows,
    mean_activation,
    pass_losses,
    reference_tensors,
    restore_references,
)
from saebench.tasks.losses import HeadInput, head_input
from saebench.tasks.reference import ReferenceCache

CHECKPOINT_SECONDS = 60.0
"""How often in-progress sums are saved for resumption."""


@dataclass(frozen=True)
class CEKLConfig:
    """Parameters of the ce_kl task."""

    tokens: int = 102_400
    """Evaluation tokens drawn (rounded up to whole contexts); --limit overrides."""
    context_len: int = 128
    """Tokens per context, BOS included; --context-len overrides."""


class CEKLTask(Task):
    """CE loss recovered, KL to the clean model, reconstruction error and sparsity."""

    spec = TaskSpec(
        name="ce_kl",
        version=2,
        headline="ce_loss_recovered",
        metrics=(
            MetricSpec("ce_loss_recovered", "higher", "(ce_zero - ce_spliced) / (ce_zero - ce_clean)"),
            MetricSpec("ce_loss_recovered_mean_abl", "higher", "(ce_mean - ce_spliced) / (ce_mean - ce_clean)"),
            MetricSpec("kl", "lower", "mean per-token KL(clean || spliced), nats"),
            MetricSpec("ce_clean", "none", "mean CE of the clean model, nats"),
            MetricSpec("ce_spliced", "lower", "mean CE with the reconstruction spliced in, nats"),
            MetricSpec("ce_zero", "none", "mean CE with the hookpoint zero-ablated, nats"),
            MetricSpec("ce_mean", "none", "mean CE with the hookpoint mean-ablated, nats"),
            MetricSpec("fve", "higher", "fraction of variance explained, 1 - nmse"),
            MetricSpec("nmse", "lower", "normalised MSE: sum ||x - x_hat||^2 / sum ||x - mean_x||^2"),
            MetricSpec("mse", "lower", "mean over tokens of ||x - x_hat||^2 / d_in"),
            MetricSpec("cos", "higher", "mean cosine similarity of x and x_hat"),
            MetricSpec("l0", "none", "mean active latents per token"),
            MetricSpec("l1", "none", "mean L1 norm of the codes per token"),
            MetricSpec("dead_frac", "lower", "fraction of latents never active on the evaluation tokens"),
            MetricSpec("dense_1e-2", "lower", "latents active on more than 1% of tokens"),
            MetricSpec("dense_1e-3", "none", "latents active on more than 0.1% of tokens"),
        ),
        tradeoffs=(("l0", "ce_loss_recovered"), ("l0", "kl"), ("l0", "nmse")),
        summary=("ce_loss_recovered", "ce_loss_recovered_mean_abl", "kl", "ce_spliced", "fve", "nmse", "mse", "cos",
                 "l0", "dead_frac", "dense_1e-2", "dense_1e-3"),
    )

    multi_hookpoint = True  # for --all-at-once; without it each hookpoint is scored on its own

    def __init__(self, tokens: int = CEKLConfig.tokens, context_len: int = CEKLConfig.context_len,
                 all_at_once: bool = False):
        self.defaults = CEKLConfig(tokens, context_len)
        self.all_at_once = all_at_once
        """Also splice each encoder given at several hookpoints at all of them at once (ce_kl_joint).
        Not in the config: it adds rows and changes none."""

    def settings(self, ctx: TaskContext) -> CEKLConfig:
        """Preset defaults overridden by the user's --limit / --context-len."""
        return CEKLConfig(ctx.settings.limit or self.defaults.tokens, ctx.settings.context_len or self.defaults.context_len)

    def config(self, ctx: TaskContext) -> dict[str, Any]:
        return asdict(self.settings(ctx))

    def rows(self, ctx: TaskContext) -> list[Row]:
        """One row per encoder at its hookpoint; with all_at_once, one more per encoder given at several."""
        rows = super().rows(ctx)
        if self.all_at_once:
            if not (joint := joint_parts(ctx)):
                raise SaebenchError("--all-at-once splices one encoder at several hookpoints together; give one at "
                                    "two or more, e.g. --encoder 'sae:default@layers.{5,15,25}.resid_post'")
            rows += [joint_row(label, parts) for label, parts in joint.items()]
        return rows

    def run(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        """Every hookpoint's encoders scored on their own, then the joint rows asked for."""
        results, means = {}, {}
        for hp, group in ctx.groups.items():
            todo = [e for e in group if ctx.wanted is None or row_key(e.spec.label, hp) in ctx.wanted]
            if todo:
                sub = ctx.at(hp)
                found = self._run_hookpoint(sub, todo)
                results |= {row_key(label, hp): result for label, result in found.items()}
                means[hp] = sub.hook.activation_mean()
        if self.all_at_once:
            cfg = self.settings(ctx)
            tokens = ctx.text.contexts(cfg.tokens, cfg.context_len)
            for label, parts in joint_parts(ctx).items():
                row = joint_row(label, parts)
                if ctx.wanted is None or row.key in ctx.wanted:
                    for hp, _ in parts:
                        if hp not in means:
                            means[hp] = self._mean_of(ctx.at(hp), cfg, tokens)
                    # the single-hookpoint run of the lowest hookpoint stored the clean pass: reuse it
                    low = _stored_references(ctx.at(parts[0][0]), cfg, tokens)
                    clean = (low["acts"], low["normed"]) if low is not None and "normed" in low else None
                    result = run_joint(ctx, tokens, parts, means, ctx.store.sub(f"joint-{len(results)}"), clean)
                    for metric in self.spec.metrics:  # activation metrics stay on the single rows
                        for field in (result.metrics, result.stderr, result.n):
                            field.setdefault(metric.name, None)
                    results[row.key] = result
        return results

    def _mean_of(self, ctx: TaskContext, cfg: CEKLConfig, tokens: Tensor) -> Tensor:
        """(d_in,) mean activation at ctx.hook.hookpoint over the evaluation tokens: from the reference cache when
        an earlier run stored it, else captured now."""
        if (stored := _stored_references(ctx, cfg, tokens)) is not None:
            return stored["mean"]
        acts = torch.cat([ctx.hook.capture(tokens[s:s + ctx.settings.batch_size]).cpu()
                          for s in tqdm(range(0, len(tokens), ctx.settings.batch_size), desc=f"mean {ctx.hook.name}",
                                        unit="batch", disable=not ctx.settings.progress)])
        return mean_activation(acts, tokens, ctx.model.bos_id)

    def _run_hookpoint(self, ctx: TaskContext, encoders: list[Encoder]) -> dict[str, TaskResult]:
        """The encoders of one hookpoint (ctx.hook.hookpoint), keyed by label."""
        cfg = self.settings(ctx)
        tokens = ctx.text.contexts(cfg.tokens, cfg.context_len)
        hp = ctx.hook.name
        zero, mean = ZeroEncoder(ctx.model.d_model, hp), MeanEncoder(ctx.model.d_model, hp)
        passes = _unique([zero, mean, *encoders], hp)
        cache = ReferenceCache(cache_dir(), "ce_kl", _reference_key(ctx, cfg)) if ctx.settings.cache_references else None
        stored = cache.load(tokens) if cache is not None else None
        if stored is not None and not _same_model_state(ctx, tokens, stored["acts"]):
            cache.discard("the model's activations on the first batch differ from the stored ones (same "
                          "model id, other weights or kernels)")
            stored = None
        state = ctx.store.load() or {"done": 0, "captured": 0, "acts": [], "normed": [],
                                       "sums": {k: PassSums(e.spec.d_latent) for k, e in passes.items()},
                                       "clean": {k: [] for k in CLEAN_SUMS}}
        refs = {_key(zero, hp): "zero", _key(mean, hp): "mean"}
        if stored is not None:
            restore_references(state, stored, refs)
            acts, mean_vec = stored["acts"], stored["mean"]
        else:
            acts = self._capture_all(ctx, tokens, state)
            mean_vec = mean_activation(acts, tokens, ctx.model.bos_id)
        ctx.hook.set_activation_mean(mean_vec)
        for enc in passes.values():
            enc.prepare(ctx.hook)
        todo = {k: e for k, e in passes.items() if stored is None or k not in refs}

        def fresh() -> dict:
            return {"normed": [], "clean": {k: [] for k in CLEAN_SUMS},
                    "sums": {k: PassSums(e.spec.d_latent) for k, e in todo.items()}}

        batches = checkpointed_batches(ctx.settings, ctx.store, len(tokens), state, f"ce_kl {hp}", CHECKPOINT_SECONDS,
                                       fresh)
        for sl, part in batches:
            cached = None if stored is None else {k: stored[k][sl] for k in ("clean.ce", "normed")
                                                  if k in stored}
            self._batch(ctx, tokens[sl], acts[sl], cached, todo, part)
        if stored is None and cache is not None:
            cache.save(reference_tensors(state, refs, tokens, acts, mean_vec))
        results = {}
        for enc in encoders:
            key = _key(enc, hp)
            results[enc.spec.label] = self._result(state, key, _key(zero, hp), _key(mean, hp), enc)
        return results

    def _capture_all(self, ctx: TaskContext, tokens: Tensor, state: dict) -> Tensor:
        """(contexts, seq, d_model) clean activations at the hookpoint, run to the hookpoint only."""
        state.setdefault("captured", len(state["acts"]))  # a checkpoint written before the counter existed
        batches = checkpointed_batches(ctx.settings, ctx.store, len(tokens), state, f"activations {ctx.hook.name}",
                                       CHECKPOINT_SECONDS, lambda: {"acts": []}, counter="captured")
        for sl, part in batches:
            part["acts"].append(ctx.hook.capture(tokens[sl]).cpu())
        return torch.cat(state["acts"])

    @torch.no_grad()
    def _batch(self, ctx: TaskContext, batch: Tensor, acts: Tensor, stored: dict[str, Tensor] | None,
               passes: dict[str, Encoder], part: dict) -> None:
        """One batch: the clean pass, then every pass in `passes` from the hookpoint, their sums added to `part`
        (this batch's share of the run's state).

        The LM head runs on the final norm's output a few predictions at a time (ce_kl_sums.pass_losses), so
        no (batch, positions, vocab) tensor is made; where saebench does not know the model's head, each pass's
        logits are scored as soon as they exist, one pass at a time.

        Args:
            acts: (B, T, d) clean activations at the hookpoint.
            stored: this batch's cached clean results ('clean.ce', optionally 'normed'); None computes them and
                records them in `part` for the cache.
        """
        sinks = sink_mask(batch, ctx.model.bos_id)
        act_mask = ~sinks  # (B, T) positions scored for activation metrics
        pred_mask = act_mask[:, :-1] & ~sinks[:, 1:]  # (B, T-1) predictions scored for CE / KL
        targets = batch[:, 1:]
        head = ctx.hook.forward.head
        clean = self._clean(ctx, batch, acts, stored, part, head)
        keep = ctx.keep_mask(batch)
        acts = acts.to(ctx.model.device)
        outputs: dict[str, HeadInput] = {}
        losses: dict[str, tuple[Tensor, Tensor]] = {}
        exact: list[str] = []
        for key, enc in passes.items():
            sums: PassSums = part["sums"][key]
            sums.start_batch(len(batch))
            spliced = splice_activations(acts, batch, keep, enc, ctx.settings.splice,
                                         sums.on_chunk(batch.shape[1], act_mask.reshape(-1)), ctx.hook.name)
            if torch.equal(spliced, acts):  # the reconstruction is exact: the spliced pass is the clean pass
                exact.append(key)
                continue
            outputs[key] = head_input(ctx.hook.forward.resume(spliced, batch, logits=head is None), head)
            if head is None:
                losses |= pass_losses(head, clean, {key: outputs.pop(key)}, targets)[1]
        nll_clean, scored = pass_losses(head, clean, outputs, targets)
        losses |= scored
        if stored is None:
            add_clean_sums(part["clean"], acts, nll_clean, act_mask, pred_mask)
        ce_clean = stored["clean.ce"] if stored is not None else part["clean"]["ce"][-1]
        for key in exact:
            part["sums"][key].end_batch(ce_clean.clone(), torch.zeros(len(batch), dtype=torch.float64))
        for key, (nll, kl) in losses.items():
            part["sums"][key].end_batch(sum_by_row(nll.cpu(), pred_mask), sum_by_row(kl.cpu(), pred_mask))

    def _clean(self, ctx: TaskContext, batch: Tensor, acts: Tensor, stored: dict[str, Tensor] | None, part: dict,
               head: LMHead | None) -> HeadInput:
        """The clean pass's final-norm output (or logits, without a known LM head): the stored one, or the pass
        from the clean activations (its norm output recorded in `part` for the reference cache)."""
        if stored is not None and "normed" in stored and head is not None:
            return stored["normed"].to(ctx.model.device), True
        out = ctx.hook.forward.resume(acts, batch, logits=head is None)
        if stored is None and out.normed is not None:
            part["normed"].append(out.normed.cpu())
        return head_input(out, head)

    def _result(self, state: dict, key: str, zero_key: str, mean_key: str, enc: Encoder) -> TaskResult:
        clean = {k: torch.cat(v) for k, v in state["clean"].items()}
        sums, zsums, msums = state["sums"][key], state["sums"][zero_key], state["sums"][mean_key]
        ce_s, ce_z, ce_m, ce_c = sums.cat("ce"), zsums.cat("ce"), msums.cat("ce"), clean["ce"]
        n_pred, n_act = clean["n_pred"], clean["n_act"]
        out: dict[str, tuple[float | None, float | None]] = {
            "ce_clean": ratio_and_se(ce_c, n_pred),
            "ce_spliced": ratio_and_se(ce_s, n_pred),
            "ce_zero": ratio_and_se(ce_z, n_pred),
            "ce_mean": ratio_and_se(ce_m, n_pred),
            "ce_loss_recovered": ratio_and_se(ce_z - ce_s, ce_z - ce_c),
            "ce_loss_recovered_mean_abl": ratio_and_se(ce_m - ce_s, ce_m - ce_c),
            "kl": ratio_and_se(sums.cat("kl"), n_pred),
            "mse": ratio_and_se(sums.cat("sse") / enc.spec.d_in, n_act),
            "cos": ratio_and_se(sums.cat("cos"), n_act),
        }
        out["nmse"] = self._nmse(sums.cat("sse"), clean)
        # FVE is 1 - nmse exactly (the same ratio of sums), so it shares nmse's standard error
        out["fve"] = (None if out["nmse"][0] is None else 1 - out["nmse"][0]), out["nmse"][1]
        has_latents = enc.has_latents and enc.spec.d_latent
        for name in ("l0", "l1"):
            out[name] = ratio_and_se(sums.cat(name), n_act) if has_latents else (None, None)
        total = n_act.sum().item()
        fired = sums.fired
        out["dead_frac"] = ((fired == 0).double().mean().item(), None) if has_latents else (None, None)
        for name, threshold in (("dense_1e-2", 1e-2), ("dense_1e-3", 1e-3)):
            out[name] = (float((fired / total > threshold).sum().item()), None) if has_latents else (None, None)
        pred_metrics = {"ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_loss_recovered",
                        "ce_loss_recovered_mean_abl", "kl"}
        n_pred_total, n_act_total = int(n_pred.sum().item()), int(total)
        extra: dict[str, Any] = {"contexts": int(len(n_act))}
        if has_latents:
            extra["curves"] = {"density": DENSITY_CURVE}
        return TaskResult(
            metrics={k: v[0] for k, v in out.items()},
            stderr={k: v[1] for k, v in out.items()},
            n={k: (n_pred_total if k in pred_metrics else n_act_total) if out[k][0] is not None else None
               for k in out},
            details=density_rows(fired, total) if has_latents else None,
            extra=extra,
        )

    @staticmethod
    def _nmse(sse: Tensor, clean: dict[str, Tensor]) -> tuple[float | None, float | None]:
        """Normalised MSE = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_x||^2 over scored tokens t: the
        error divided by that of predicting the mean activation (the normalised MSE O'Neill, Gumran & Klindt
        2024 track, "Compute Optimal Inference and Provable Amortisation Gap in Sparse Autoencoders");
        FVE = 1 - nmse.

        mean_x is the mean activation over all scored tokens (one vector, not per batch), so
        the denominator is the total variance of the evaluated activations. The per-context
        denominator is sum ||x||^2 - 2 mean_x . sum x + n ||mean_x||^2.
        """
        n, sum_x, sum_sq = clean["n_act"], clean["sum_x"], clean["sum_sq"]
        mean_x = sum_x.sum(0) / n.sum()
        sst = sum_sq - 2 * sum_x @ mean_x + n * (mean_x @ mean_x)
        return ratio_and_se(sse, sst)


def _reference_key(ctx: TaskContext, cfg: CEKLConfig) -> dict[str, Any]:
    """Everything the clean, zero and mean passes depend on (the reference cache's key)."""
    import transformers

    model = ctx.model
    return {"model": model.model_id, "revision": model.revision, "dtype": model.dtype,
            "device": torch.device(model.device).type, "hookpoint": ctx.hook.name, "corpus": ctx.settings.corpus.name,
            "seed": ctx.settings.seed, "context_len": cfg.context_len, "tokens": cfg.tokens,
            "splice_bos": ctx.settings.splice.splice_bos, "torch": torch.__version__, "transformers": transformers.__version__}


def _stored_references(ctx: TaskContext, cfg: CEKLConfig, tokens: Tensor) -> dict[str, Tensor] | None:
    """The reference cache's entry for ctx.hook.hookpoint and these tokens, if there is a valid one."""
    if not ctx.settings.cache_references:
        return None
    stored = ReferenceCache(cache_dir(), "ce_kl", _reference_key(ctx, cfg)).load(tokens)
    return stored if stored is not None and _same_model_state(ctx, tokens, stored["acts"]) else None


def _same_model_state(ctx: TaskContext, tokens: Tensor, stored_acts: Tensor) -> bool:
    """Whether the model still produces the stored activations on the first batch.

    The cache key names the model by id, revision and dtype; a model object whose weights or
    attention kernel changed under the same id (an in-process edit, a bridged copy) would
    otherwise get another model's reference passes. Costs one pass to the hookpoint.
    """
    fresh = ctx.hook.capture(tokens[:ctx.settings.batch_size]).cpu()
    # exact: the same model gives the same activations for the same batch; another attention
    # kernel differs by rounding only, and that is enough to change the reference passes
    return torch.equal(fresh, stored_acts[:ctx.settings.batch_size])


def _key(enc: Encoder, hookpoint: str) -> str:
    spec = enc.spec.to_dict() | {"hookpoint": enc.spec.hookpoint or hookpoint}
    return json.dumps(spec, sort_keys=True, default=str)


def _unique(encoders: list[Encoder], hookpoint: str) -> dict[str, Encoder]:
    """Encoders by spec key; a user's `zero` or `mean` reuses the task's own ablation pass."""
    out: dict[str, Encoder] = {}
    for enc in encoders:
        out.setdefault(_key(enc, hookpoint), enc)
    return out
