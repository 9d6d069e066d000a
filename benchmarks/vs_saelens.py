"""saebench's ce_kl next to sae-lens's own run_evals: same SAE, same model object, same tokens.

Everything runs in one process on the embedded SmolLM2-135M-Instruct (dtype auto, CPU) and saebench's
default SAE (`sae:default`, a sae-lens TopK SAE at layers.15.resid_post = blocks.15.hook_resid_post):

  S0  saebench `evaluate(..., ["sae:default"], ["ce_kl"])` on the model as saebench loads it.
  --  `SAETransformerBridge.boot_transformers(hf_model=<that model object>)`. Booting swaps the
      model's decoder layers for TransformerLens bridge blocks *in place* (their attention is the
      eager implementation; saebench loads the model with sdpa), so every later pass, saebench's
      included, runs through the bridge.
  S6  sae-lens `run_evals` on the bridge, fed by sae-lens's own ActivationsStore over a
      pretokenized dataset holding exactly saebench's contexts, with sae-lens's defaults
      (`exclude_special_tokens=True`).
  S1, S2  saebench again on the bridged model, with default settings and with `splice_bos=True`
      (the latter only for its zero-ablation CE, which then also zeroes BOS, as sae-lens does).

Observation taps on `sae_lens.evals.get_recons_loss`, `sae_lens.evals._kl` and the bridge's
`loss_fn` keep the per-token CE / KL that run_evals averages, plus the same quantities recomputed
in float32 from the same logits; they return sae-lens's own values unchanged (the script checks
that re-averaging the tapped values reproduces run_evals's output exactly). The stages S0..S6 then
move from saebench's number to sae-lens's one definitional or numerical change at a time, and each
step's measured delta is printed with the choice that causes it.

Usage:
    python benchmarks/vs_saelens.py [--tokens 102400] [--batch-size 8]
"""

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import BuildContext
from saebench.models import LoadedModel, cache_dir, load_model
from saebench.runner import RunConfig, evaluate
from saebench.splice import sink_mask
from saebench.tasks.reference import remove_entries
from saebench.encoders.default_sae import default_sae_dir

MODEL = "smollm2-135m"
CE_KL_KEYS = ("ce_loss_recovered", "kl", "ce_clean", "ce_spliced", "ce_zero")


@dataclass
class SaebenchRun:
    """Metrics and timings of one saebench ce_kl run."""

    metrics: dict[str, float]
    wall_s: float
    """evaluate() wall time (SAE load, token drawing, activation mean and all passes)."""
    task_s: float
    """Time the task itself took, as written in the record."""


@dataclass
class Tap:
    """Per-batch tensors recorded while sae-lens's run_evals runs (values it returns are untouched)."""

    tokens: list[Tensor] = field(default_factory=list)  # (B, T) per batch
    loss: list[list[Tensor]] = field(default_factory=list)  # per batch: clean, sae, zero CE (B, T-1), bf16
    loss32: list[list[Tensor]] = field(default_factory=list)  # the same CE recomputed in float32
    kl: list[list[Tensor]] = field(default_factory=list)  # per batch: sae, zero KL (B, T), bf16
    kl32: list[list[Tensor]] = field(default_factory=list)  # the SAE pass's KL recomputed in float32
    seconds: float = 0.0
    """Time spent in the taps' own float32 recomputation (subtracted from sae-lens's wall time)."""


def draw_contexts(lm: LoadedModel, n_tokens: int, batch_size: int) -> Tensor:
    """saebench's evaluation contexts, a whole number of batches of them.

    sae-lens's run_evals reads `n_batches * batch_size` contexts and its ActivationsStore silently
    wraps around at the end of the dataset, so the count is rounded up to a multiple of the batch.
    """
    n_ctx = -(-n_tokens // 128)
    n_ctx = -(-n_ctx // batch_size) * batch_size
    return token_contexts(lm.tokenizer, CorpusSpec("wiki", "eval"), 128, n_ctx * 128, 0, lm.bos_id)


def run_saebench(lm: LoadedModel, encoders: list[str], n_tokens: int, batch_size: int, out: Path,
                 splice_bos: bool = False, cache_references: bool = True) -> SaebenchRun:
    """Score `encoders` with saebench's ce_kl task on `lm` and return the first record's metrics."""
    config = RunConfig(limit=n_tokens, batch_size=batch_size, output_dir=out, reuse=False, progress=False,
                       splice_bos=splice_bos, cache_references=cache_references)
    start = time.perf_counter()
    records = evaluate(lm, encoders, ["ce_kl"], config)
    wall = time.perf_counter() - start
    return SaebenchRun(dict(records[0].metrics), wall, records[0].seconds)


def boot_bridge(lm: LoadedModel):
    """Wrap saebench's HF model object in sae-lens's TransformerLens v3 bridge.

    Compatibility mode is needed for the legacy hook name `blocks.15.hook_resid_post` that the
    SAE's config carries: without it the bridge's run_with_hooks silently skips unknown names,
    and run_evals would score an un-spliced model. `no_processing=True` keeps the raw weights
    (folding / centering would change the residual stream the SAE was trained on).
    """
    from sae_lens import SAETransformerBridge

    bridge = SAETransformerBridge.boot_transformers(MODEL, hf_model=lm.model, tokenizer=lm.tokenizer,
                                                    dtype=lm.model.dtype, device=str(lm.device))
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge


def install_taps(bridge, tap: Tap):
    """Record per-token CE / KL inside run_evals; returns a function that removes the taps."""
    import sae_lens.evals as evals

    orig_recons, orig_kl, orig_loss = evals.get_recons_loss, evals._kl, bridge.loss_fn
    active = [False]

    def loss_fn(logits, tokens, attention_mask=None, per_token=False):
        out = orig_loss(logits, tokens, attention_mask=attention_mask, per_token=per_token)
        if active[0]:
            t0 = time.perf_counter()
            z = logits[:, :-1].float()
            tap.loss[-1].append(out.detach().cpu())
            tap.loss32[-1].append((z.logsumexp(-1) - z.gather(-1, tokens[:, 1:, None]).squeeze(-1)).cpu())
            tap.seconds += time.perf_counter() - t0
        return out

    def kl(original_logits, new_logits):
        out = orig_kl(original_logits, new_logits)
        tap.kl[-1].append(out.detach().cpu())
        if len(tap.kl[-1]) == 1:  # the SAE pass comes first; the zero-ablation KL is not compared
            t0 = time.perf_counter()
            logp, logq = torch.log_softmax(original_logits.float(), -1), torch.log_softmax(new_logits.float(), -1)
            tap.kl32[-1].append((logp.exp() * (logp - logq)).sum(-1).cpu())
            tap.seconds += time.perf_counter() - t0
        return out

    def recons(sae, model, scaler, batch_tokens, *args, **kwargs):
        tap.tokens.append(batch_tokens.cpu())
        for rows in (tap.loss, tap.loss32, tap.kl, tap.kl32):
            rows.append([])
        active[0] = True
        try:
            return orig_recons(sae, model, scaler, batch_tokens, *args, **kwargs)
        finally:
            active[0] = False

    evals.get_recons_loss, evals._kl, bridge.loss_fn = recons, kl, loss_fn

    def remove() -> None:
        evals.get_recons_loss, evals._kl = orig_recons, orig_kl
        del bridge.loss_fn

    return remove


def run_saelens(bridge, sae_path: Path, tokens: Tensor, batch_size: int, tap: Tap) -> tuple[dict, float]:
    """sae-lens's run_evals over exactly `tokens`; returns its flattened metrics and wall time."""
    from datasets import Dataset
    from sae_lens import SAE, ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = SAE.load_from_disk(sae_path)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    store = ActivationsStore.from_sae(bridge, sae, dataset=dataset, context_size=tokens.shape[1], streaming=False,
                                      store_batch_size_prompts=batch_size, total_tokens=len(dataset))
    n_batches = len(tokens) // batch_size
    config = EvalConfig(batch_size_prompts=batch_size, n_eval_reconstruction_batches=n_batches,
                        compute_kl=True, compute_ce_loss=True, n_eval_sparsity_variance_batches=n_batches,
                        compute_sparsity_metrics=True, compute_variance_metrics=True)
    remove = install_taps(bridge, tap)
    try:
        start = time.perf_counter()
        metrics, _ = run_evals(sae, store, bridge, ActivationScaler(), config)
        wall = time.perf_counter() - start
    finally:
        remove()
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    return flat, wall


def _cat(rows: list[list[Tensor]], i: int, n_ctx: int | None = None) -> Tensor:
    return torch.cat([r[i] for r in rows])[:n_ctx]


def tapped_stages(tap: Tap, special_ids: list[int], bos_id: int,
                  n_ctx: int | None = None) -> dict[str, dict[str, float]]:
    """CE / KL stages recomputed from the tapped per-token values (float64 means).

    S3: float32 values, saebench's populations: predictions at non-sink positions whose target
        is not BOS (sinks = position 0 and BOS tokens), last position has no target.
    S4: float32 values, sae-lens's populations: CE over predictions made at non-special positions
        (target unrestricted), KL over every non-special position including the last one.
    S5: sae-lens's own bf16 per-token values, sae-lens's populations, averaged in float64.
    S6: as S5 but averaged as run_evals does (bf16 torch mean of the bf16 values).
    Only the first `n_ctx` contexts are used when given (saebench's contexts for a smaller
    limit are a prefix of those for a larger one, with the same seed).
    """
    ids = torch.cat(tap.tokens)[:n_ctx]
    sinks = sink_mask(ids, bos_id)
    sb_pred = ~sinks[:, :-1] & ~sinks[:, 1:]
    sl_pos = ~torch.isin(ids, torch.tensor(special_ids))
    out = {}
    for stage, loss, kl, ce_mask, kl_mask in (
        ("S3", tap.loss32, tap.kl32, sb_pred, torch.cat([sb_pred, torch.zeros_like(sinks[:, :1])], 1)),
        ("S4", tap.loss32, tap.kl32, sl_pos[:, :-1], sl_pos),
        ("S5", tap.loss, tap.kl, sl_pos[:, :-1], sl_pos),
    ):
        m = {name: _cat(loss, i, n_ctx)[ce_mask].double().mean().item()
             for i, name in enumerate(("ce_clean", "ce_spliced", "ce_zero"))}
        m["kl"] = _cat(kl, 0, n_ctx)[kl_mask].double().mean().item()
        out[stage] = _with_recovered(m)
    bf16_mean = {name: _cat(tap.loss, i, n_ctx)[sl_pos[:, :-1]].mean().item()
                 for i, name in enumerate(("ce_clean", "ce_spliced", "ce_zero"))}
    bf16_mean["kl"] = _cat(tap.kl, 0, n_ctx)[sl_pos].mean().item()
    out["S6"] = _with_recovered(bf16_mean)
    out["_counts"] = {
        "ce_sb": int(sb_pred.sum()), "ce_sl": int(sl_pos[:, :-1].sum()),
        "kl_sl": int(sl_pos.sum()),
        "bos_target": int((sl_pos[:, :-1] & (ids[:, 1:] == bos_id)).sum()),
        "last_pos": int(sl_pos[:, -1].sum()),
    }
    return out


def _with_recovered(m: dict[str, float]) -> dict[str, float]:
    """Add ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)."""
    return m | {"ce_loss_recovered": (m["ce_zero"] - m["ce_spliced"]) / (m["ce_zero"] - m["ce_clean"])}


def saelens_as_saebench(sl: dict) -> dict[str, float]:
    """sae-lens's run_evals metrics under saebench's names."""
    return {"ce_loss_recovered": sl["ce_loss_score"], "kl": sl["kl_div_with_sae"],
            "ce_clean": sl["ce_loss_without_sae"], "ce_spliced": sl["ce_loss_with_sae"],
            "ce_zero": sl["ce_loss_with_ablation"], "fve": sl["explained_variance"], "l0": sl["l0"]}


STEPS = {
    "S0": "saebench ce_kl, model as saebench loads it (sdpa attention)",
    "S1": "saebench ce_kl on the bridged model object (eager attention)",
    "S2": "S1 with ce_zero from saebench splice_bos=True (zero ablation also at BOS)",
    "S3": "sae-lens per-token values recomputed in float32, saebench's populations",
    "S4": "as S3, sae-lens's populations",
    "S5": "sae-lens's bf16 per-token values, sae-lens's populations, float64 mean",
    "S6": "sae-lens's bf16 per-token values averaged as run_evals does (bf16 torch mean)",
}

WHY = {
    "S1": "attention kernel: booting the bridge replaced saebench's sdpa attention with the bridge's eager "
          "attention, both bf16 (numerics, not a definition)",
    "S2": "zero-ablation scope: sae-lens's zero hook zeroes every position, BOS included; saebench passes "
          "attention sinks through (splice_bos=False); only ce_zero and ce_loss_recovered can move",
    "S3": "implementation only (saebench's splice vs sae-lens's TransformerLens hooks; same model, same definitions)",
    "S4": "population: sae-lens averages CE over predictions made at non-special positions incl. those whose "
          "target is BOS ({bos_target} here), and KL over every non-special position incl. the last one of each "
          "context ({last_pos}) and those before a BOS; saebench excludes both",
    "S5": "per-token precision: TransformerLens / sae-lens take log_softmax and KL of the bf16 logits in bf16; "
          "saebench casts logits to float32 first",
    "S6": "mean precision: run_evals averages bf16 per-token values with a bf16 torch .mean(), so each reported "
          "mean is a bf16 number (spacing 1/64 nat in [2, 4), 1/16 nat in [8, 16))",
}


def fmt(x: float | None, width: int = 11) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.6f}"


def print_side_by_side(sb: dict, sl: dict, sl_raw: dict) -> None:
    print("\n== Side by side, full size: saebench defaults vs sae-lens run_evals defaults ==")
    print(f"{'metric':<20}{'saebench':>11}{'sae-lens':>11}{'sl - sb':>11}   sae-lens key")
    names = {"ce_loss_recovered": "ce_loss_score", "kl": "kl_div_with_sae", "ce_clean": "ce_loss_without_sae",
             "ce_spliced": "ce_loss_with_sae", "ce_zero": "ce_loss_with_ablation", "fve": "explained_variance",
             "l0": "l0"}
    for key, sl_key in names.items():
        print(f"{key:<20}{fmt(sb[key])}{fmt(sl[key])}{fmt(sl[key] - sb[key])}   {sl_key}")
    print(f"(sae-lens also reports explained_variance_legacy={sl_raw['explained_variance_legacy']:.6f}, "
          f"kl_div_score={sl_raw['kl_div_score']:.6f}, mse={sl_raw['mse']:.2f} = sum over d_in, saebench's mse "
          f"= {sb['mse']:.4f} is per dimension)")


def print_chain(title: str, stages: dict[str, dict[str, float]], counts: dict[str, int]) -> None:
    """The stages as a table, then each step's measured delta and its cause."""
    print(f"\n== {title} ==")
    names = list(stages)
    for name in names:
        print(f"  {name}: {STEPS[name]}")
    print(f"{'stage':<7}" + "".join(f"{k:>19}" for k in CE_KL_KEYS))
    for name in names:
        print(f"{name:<7}" + "".join(f"{stages[name][k]:>19.6f}" for k in CE_KL_KEYS))
    for prev, name in zip(names, names[1:]):
        delta = {k: stages[name][k] - stages[prev][k] for k in CE_KL_KEYS}
        moved = ", ".join(f"d{k}={delta[k]:+.2e}" for k in CE_KL_KEYS if delta[k] != 0)
        skipped = range(int(prev[1]) + 1, int(name[1]) + 1)
        why = WHY[name].format(**counts) if len(skipped) == 1 else (
            " + ".join(WHY[f"S{i}"].split(":")[0] for i in skipped) + " (separated in the subset table)")
        print(f"{prev}->{name}: {moved or 'identical'}")
        print(f"    because: {why}")


def print_agreement(full: dict, sub: dict | None, sb: dict, sl: dict, sb_bridged: dict | None) -> None:
    print("\n== Agreement (tolerance 1e-3) ==")
    for key in ("ce_loss_recovered", "kl"):
        raw = abs(full["S6"][key] - full["S0"][key])
        line = f"{key}: |sae-lens - saebench| = {raw:.2e} ({'within' if raw <= 1e-3 else 'outside'} 1e-3)"
        if sub is not None:
            matched = abs(sub["S3"][key] - sub["S2"][key])
            line += (f"; same model and definitions (S3 vs S2, subset) = {matched:.2e} "
                     f"({'within' if matched <= 1e-3 else 'outside'} 1e-3)")
        print(line)
    print(f"fve vs explained_variance: |sae-lens - saebench| = {abs(sl['fve'] - sb['fve']):.2e}; same definition "
          "(1 - sum||x - x_hat||^2 / sum||x - mean x||^2) and population (non-BOS tokens, pooled)"
          + ("" if sb_bridged is None else "; on the subset saebench's own fve moves by the attention kernel alone "
             "(S0 vs S1 fve above)"))
    print(f"l0: saebench {sb['l0']:.4f}, sae-lens {sl['l0']:.4f} (same population)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=102_400, help="evaluation tokens (default 102400)")
    parser.add_argument("--matched-tokens", type=int, default=12_800,
                        help="tokens (a prefix of the same contexts) for the extra saebench runs that separate "
                             "the attention-kernel and zero-ablation effects; 0 skips them (default 12800)")
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass, both harnesses")
    args = parser.parse_args(argv)
    from sae_lens.util import get_special_token_ids

    lm = load_model(MODEL)
    sae_path, _ = default_sae_dir(BuildContext(lm, None, cache_dir()))
    tokens = draw_contexts(lm, args.tokens, args.batch_size)
    n_tokens, special = tokens.numel(), sorted(get_special_token_ids(lm.tokenizer))
    n_sub = min(-(-args.matched_tokens // 128), len(tokens))
    print(f"model {MODEL} ({lm.model.dtype}, {lm.model.config._attn_implementation} attention), SAE {sae_path.name}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{len(tokens)} contexts x {tokens.shape[1]} = {n_tokens} tokens; BOS id {lm.bos_id}; sae-lens special ids "
          f"{special}; BOS tokens past position 0: {int((tokens[:, 1:] == lm.bos_id).sum())}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        remove_entries(cache_dir(), "ce_kl", model=lm.model_id, tokens=n_tokens, hookpoint="layers.15.resid_post")
        s0 = run_saebench(lm, ["sae:default"], n_tokens, args.batch_size, out / "s0")
        print(f"[S0 saebench, reference cache cold, done in {s0.wall_s:.1f}s]", flush=True)
        s0_warm = run_saebench(lm, ["sae:default"], n_tokens, args.batch_size, out / "s0warm")
        print(f"[S0 saebench, reference cache warm, done in {s0_warm.wall_s:.1f}s]", flush=True)
        if s0_warm.metrics != s0.metrics:
            raise RuntimeError("saebench's warm-cache run differs from its cold run")
        t0 = time.perf_counter()
        bridge = boot_bridge(lm)
        boot_s = time.perf_counter() - t0
        tap = Tap()
        sl_raw, sl_wall = run_saelens(bridge, sae_path, tokens, args.batch_size, tap)
        print(f"[S6 sae-lens done in {sl_wall:.1f}s]", flush=True)
        sl = saelens_as_saebench(sl_raw)
        full = tapped_stages(tap, special, lm.bos_id)
        counts = full.pop("_counts")
        if any(full["S6"][k] != sl[k] for k in ("ce_clean", "ce_spliced", "ce_zero", "kl")):
            raise RuntimeError(f"the taps do not reproduce run_evals: {full['S6']} vs {sl}")
        full = {"S0": {k: s0.metrics[k] for k in CE_KL_KEYS}} | full
        print_side_by_side(s0.metrics, sl, sl_raw)
        print_chain(f"Full size ({n_tokens} tokens): saebench S0 -> sae-lens S6", full, counts)
        print(f"(populations: saebench CE/KL n={counts['ce_sb']}; sae-lens CE n={counts['ce_sl']}, "
              f"KL n={counts['kl_sl']}; re-averaging the tapped values as run_evals does reproduces its CE and KL "
              "exactly, so the taps changed nothing)")
        print_timing(s0, s0_warm, sl_wall, tap.seconds, boot_s)

        sub = s1 = None
        if n_sub:
            sub, s1 = matched_chain(lm, tap, special, n_sub, args.batch_size, out)
        print_agreement(full, sub, s0.metrics, sl, s1)
    return 0


def matched_chain(lm: LoadedModel, tap: Tap, special: list[int], n_sub: int, batch_size: int, out: Path):
    """S0..S6 on the first `n_sub` contexts, with the extra saebench runs that isolate each step."""
    n = n_sub * 128
    if not torch.equal(draw_contexts(lm, n, 1), torch.cat(tap.tokens)[:n_sub]):
        raise RuntimeError("saebench's contexts for the subset are not a prefix of the full run's")
    # The bridged model runs eager attention under the same model id: its reference passes are
    # not the plain model's, so they are neither read from nor written to saebench's cache.
    s1 = run_saebench(lm, ["sae:default"], n, batch_size, out / "s1", cache_references=False)
    s2 = run_saebench(lm, ["zero"], n, batch_size, out / "s2", splice_bos=True, cache_references=False)
    # The original model object is bridged by now: S0 on the subset uses a fresh copy of the same weights.
    s0 = run_saebench(load_model(MODEL), ["sae:default"], n, batch_size, out / "s0sub")
    print(f"[subset runs done: S1 {s1.wall_s:.1f}s, S2 {s2.wall_s:.1f}s, S0 {s0.wall_s:.1f}s]", flush=True)
    tapped = tapped_stages(tap, special, lm.bos_id, n_sub)
    counts = tapped.pop("_counts")
    stages = {"S0": {k: s0.metrics[k] for k in CE_KL_KEYS}, "S1": {k: s1.metrics[k] for k in CE_KL_KEYS}}
    stages["S2"] = _with_recovered({**stages["S1"], "ce_zero": s2.metrics["ce_zero"]})
    stages |= tapped
    print_chain(f"Subset ({n} tokens, the first {n_sub} contexts): every step isolated", stages, counts)
    print(f"fve on the subset: saebench S0 {s0.metrics['fve']:.6f}, saebench on the bridged model S1 "
          f"{s1.metrics['fve']:.6f} (the difference is the attention kernel's effect on layer-15 activations)")
    return stages, s1.metrics


def print_timing(cold: SaebenchRun, warm: SaebenchRun, sl_wall: float, tap_s: float, boot_s: float) -> None:
    sl_net = sl_wall - tap_s
    print("\n== Wall time (same process, same CPU) ==")
    print(f"saebench evaluate(), reference cache cold: {cold.wall_s:.1f}s (task {cold.task_s:.1f}s)")
    print(f"saebench evaluate(), reference cache warm: {warm.wall_s:.1f}s (task {warm.task_s:.1f}s)")
    print(f"sae-lens run_evals: {sl_net:.1f}s ({sl_wall:.1f}s minus {tap_s:.1f}s in this script's taps); "
          f"bridge boot {boot_s:.1f}s not counted")
    print(f"ratio sae-lens / saebench: cold {sl_net / cold.wall_s:.2f}, warm {sl_net / warm.wall_s:.2f}")
    print("passes per batch: saebench cold 1 to layer 15 + 4 from layer 16 (clean, zero, mean ablation, SAE), "
          "warm 1 from layer 16 (SAE) + the LM head on the cached clean final-norm output; sae-lens 3 full "
          "(clean, SAE, zero) + 1 to layer 16 (sparsity / variance); sae-lens runs eager attention after "
          "booting the bridge, saebench sdpa", flush=True)


if __name__ == "__main__":
    sys.exit(main())
