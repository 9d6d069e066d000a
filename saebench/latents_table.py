"""``saebench latents``: one row per latent joining how interpretable it is with what splicing it costs.

From the records in a runs folder, per SAE (an llm_sim encoder's inner SAE, at its hookpoint) and latent:
- from ``autointerp`` (one per explanation source): firing frequency, explanation, each scorer's score;
- from ``latent_recall`` (the same llm_sim encoder): the simulator's recall and specificity on that latent;
- from ``lambada`` (the SAE itself): the latent's frequency-controlled mean Δlog p of the answer when the SAE
  is spliced (Anders & Bloom's helpful/harmful score; negative: harmful).

Then the Spearman correlation of every pair of columns over the latents both have, with a 95% bootstrap
interval (latents resampled with replacement, 1000 times, seeded), set beside 001's Table 1 where it reports
the same pair, and a scatter of interpretability against harm. ``--delphi DIR`` also writes each autointerp
record's explanations and scores as delphi's run folder (saebench.delphi_files). Reads records only.
"""

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from saebench.delphi_files import write_explanations, write_scores
from saebench.errors import SaebenchError
from saebench.records import RunRecord, scan_record_files, write_atomic
from saebench.report import encoder_display

SCORE_COLUMNS = {"detection": ("detection_auc", "detection_balanced_accuracy"),
                 "fuzzing": ("fuzzing_auc", "fuzzing_balanced_accuracy"),
                 "surprisal": ("surprisal_auc",), "embedding": ("embedding_auc",), "intervention": ("intervention_score",)}
"""The per-latent score each scorer contributes to the table: the first it has of these (AUC where the judge gave
probabilities, one example per prompt; else delphi's balanced accuracy; intervention's NLL gain)."""
PAPER_TABLE_1 = {("fuzzing", "detection"): 0.73, ("fuzzing", "simulation"): 0.70,
                 ("detection", "simulation"): 0.44, ("embedding", "simulation"): 0.41,
                 ("surprisal", "simulation"): 0.30, ("embedding", "surprisal"): 0.20}
"""Spearman correlations 001 reports in its Table 1 (over 600 latents; its text gives these pairs). Its
'simulation' is OpenAI's simulation score; the nearest column here is the llm_sim recall on the latent."""
PAPER_PAIRS = {"recall": "simulation"}
BOOTSTRAP = 1000


def _details(path: Path, rec: RunRecord) -> list[dict[str, Any]]:
    if not rec.details_file:
        return []
    file = path.parent / rec.details_file
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.open(encoding="utf-8") if line.strip()]


def _sae_key(rec: RunRecord) -> tuple[str, str | None]:
    """(the SAE's label, hookpoint): an llm_sim encoder's inner SAE, or the encoder itself."""
    inner = rec.encoder.get("params", {}).get("inner")
    return (inner["label"] if inner else rec.encoder["label"]), rec.hookpoint


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    """One table per autointerp record: {'title', 'sae', 'rows', 'record', 'path'}; rows per latent."""
    found, _ = scan_record_files(runs_dir)
    auto = [(p, r) for p, r in found if r.task["name"] == "autointerp"]
    if not auto:
        raise SaebenchError(f"no autointerp records in {str(runs_dir)!r}; run e.g. saebench run --model smollm2-135m "
                            "--encoder 'llm_sim:sae:default' --task autointerp --output " + str(runs_dir))
    recall = {(r.encoder["label"], r.hookpoint): (p, r) for p, r in found if r.task["name"] == "latent_recall"}
    harm = {_sae_key(r): (p, r) for p, r in found if r.task["name"] == "lambada"}
    tables = []
    for path, rec in sorted(auto, key=lambda pr: (pr[1].encoder["label"], pr[1].hookpoint or "")):
        rows = {r["latent"]: {"latent": r["latent"], "frequency": r["frequency"], "explanation": r["explanation"],
                              **{s: next((r[c] for c in cols if _num(r.get(c))), None)
                                 for s, cols in SCORE_COLUMNS.items() if any(c in r for c in cols)}}
                for r in _details(path, rec) if r.get("kind") == "latent"}
        if (rec.encoder["label"], rec.hookpoint) in recall:
            for r in _details(*recall[(rec.encoder["label"], rec.hookpoint)]):
                if r.get("kind") == "latent" and r["latent"] in rows:
                    rows[r["latent"]] |= {"recall": r["recall"], "specificity": r["specificity"]}
        if _sae_key(rec) in harm:
            for r in _details(*harm[_sae_key(rec)]):
                if r.get("kind") == "feature" and r["feature"] in rows:
                    rows[r["feature"]]["delta_logp"] = r.get("controlled_delta_logp", r.get("mean_delta_logp"))
        display = encoder_display(rec)
        title = (f"{_sae_key(rec)[0]} @ {rec.hookpoint}, explanations {display.get('explanations', '?')}, "
                 f"judged by {rec.extra.get('judge', '?')}")
        tables.append({"title": title, "sae": _sae_key(rec), "rows": [rows[k] for k in sorted(rows)], "record": rec,
                       "path": path})
    return tables


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    order = ["frequency", *SCORE_COLUMNS, "recall", "specificity", "delta_logp"]
    return [c for c in order if any(_num(r.get(c)) for r in rows)]


def spearman_ci(x: list[float], y: list[float], seed: int = 0) -> tuple[float, float, float, int]:
    """Spearman's rho of the pairs, and its 95% percentile bootstrap interval over resampled pairs."""
    from scipy.stats import spearmanr

    a, b = np.asarray(x, float), np.asarray(y, float)
    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(a), len(a))
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            draws.append(spearmanr(a[i], b[i]).statistic)
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (math.nan, math.nan))
    return rho, float(lo), float(hi), len(a)


MIN_OFF_MODE = 5
"""A pair of columns gets no correlation unless, among the latents holding both values, at least this many differ
from each column's most common value: a rank correlation with a nearly constant column (llm_sim specificity is 1.0
on almost every latent) rests on a handful of latents, and its bootstrap interval, drawn from the resamples that
happen to keep one of them, is narrow where it should be undefined."""


def off_mode(values: list[float]) -> int:
    """How many of `values` differ from their most common value (0 for none)."""
    return len(values) - Counter(values).most_common(1)[0][1] if values else 0


def correlations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of numeric columns over the latents holding both values: Spearman's rho with its bootstrap
    interval, or, where fewer than MIN_OFF_MODE of those latents are off either column's most common value,
    rho None (left out)."""
    cols = numeric_columns(rows)
    out = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            pairs = [(r[a], r[b]) for r in rows if _num(r.get(a)) and _num(r.get(b))]
            if min(off_mode([p[0] for p in pairs]), off_mode([p[1] for p in pairs])) < MIN_OFF_MODE:
                out.append({"a": a, "b": b, "rho": None, "n": len(pairs)})
                continue
            rho, lo, hi, n = spearman_ci([p[0] for p in pairs], [p[1] for p in pairs])
            names = (PAPER_PAIRS.get(a, a), PAPER_PAIRS.get(b, b))
            paper = PAPER_TABLE_1.get(names, PAPER_TABLE_1.get(names[::-1]))
            out.append({"a": a, "b": b, "rho": rho, "lo": lo, "hi": hi, "n": n, "paper": paper})
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def markdown(tables: list[dict[str, Any]], max_rows: int = 30) -> str:
    parts = ["# Latents: interpretability beside faithfulness", ""]
    for t in tables:
        rows, cols = t["rows"], numeric_columns(t["rows"])
        parts += [f"## {t['title']}", "", f"{len(rows)} latents (a frequency-stratified sample; "
                  f"{'all' if len(rows) <= max_rows else f'the first {max_rows} by latent id'} shown). Detection and "
                  "fuzzing: AUC where the judge gave probabilities, else balanced accuracy; surprisal, embedding: AUC; "
                  "recall, specificity: the llm_sim simulator's on the latent (latent_recall); delta_logp: lambada's "
                  "frequency-controlled Δlog p of the answer with the SAE spliced (< 0: harmful).", ""]
        parts.append("| latent | " + " | ".join(cols) + " | explanation |")
        parts.append("|---:|" + "---:|" * len(cols) + "---|")
        for r in rows[:max_rows]:
            cells = [_fmt(r.get(c)) for c in cols]
            text = r["explanation"].replace("|", "\\|").replace("\n", " ")[:90]
            parts.append(f"| {r['latent']} | " + " | ".join(cells) + f" | {text} |")
        corr = correlations(rows)
        computed = [c for c in corr if c["rho"] is not None]
        if computed:
            parts += ["", "Spearman correlations (95% bootstrap interval over latents; 001's Table 1 where it "
                          "reports the pair, its 'simulation' set beside llm_sim recall):", "",
                      "| columns | rho | 95% CI | latents | 001 Table 1 |", "|---|---:|---|---:|---:|"]
            for c in computed:
                paper = "" if c["paper"] is None else f"{c['paper']:.2f}"
                parts.append(f"| {c['a']} ~ {c['b']} | {c['rho']:.2f} | [{c['lo']:.2f}, {c['hi']:.2f}] | {c['n']} "
                             f"| {paper} |")
            if any("recall" in (c["a"], c["b"]) for c in computed):
                parts += ["", "000 (EleutherAI, Figure 6) finds fuzzing and detection scores \"predictive of whether a "
                              "latent is correctly identified as either active or non-active\", not linearly; with the "
                              "score in the prompt its recall rose to 0.58 / 0.57 from 0.42 (its Table 1)."]
        if left := [c for c in corr if c["rho"] is None]:
            names = ", ".join(f"{c['a']} ~ {c['b']}" for c in left)
            parts += ["", f"Left out: {names}. Among the latents holding both values, fewer than {MIN_OFF_MODE} "
                          "differ from one column's most common value, so a rank correlation would rest on a handful "
                          "of latents."]
            for col in sorted({x for c in left for x in (c["a"], c["b"])}, key=cols.index):
                values = [r[col] for r in rows if _num(r.get(col))]
                if off_mode(values) < MIN_OFF_MODE:
                    mode, count = Counter(values).most_common(1)[0]
                    parts.append(f"{col}: {count} of {len(values)} latents have the value {_fmt(mode)}.")
        parts.append("")
    return "\n".join(parts)


def _fmt(v: Any) -> str:
    if not _num(v):
        return ""
    return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"


def harm_plot(tables: list[dict[str, Any]], path: Path) -> Path | None:
    """Interpretability (fuzzing, else detection balanced accuracy) against the latent's Δlog p, one panel per
    table; None when no table has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = []
    for t in tables:
        score = next((s for s in ("fuzzing", "detection", "surprisal", "embedding")
                      if any(_num(r.get(s)) and _num(r.get("delta_logp")) for r in t["rows"])), None)
        if score:
            usable.append((t, score))
    if not usable:
        return None
    fig, axes = plt.subplots(1, len(usable), figsize=(5 * len(usable), 4), squeeze=False)
    for ax, (t, score) in zip(axes[0], usable):
        pts = [(r[score], r["delta_logp"], r["frequency"]) for r in t["rows"] if _num(r.get(score)) and _num(r.get("delta_logp"))]
        xs, ys, fs = zip(*pts)
        sc = ax.scatter(xs, ys, c=np.log10(np.maximum(fs, 1e-7)), cmap="viridis", s=18)
        ax.axhline(0, color="grey", lw=0.8)
        rho = spearman_ci(list(xs), list(ys))[0] if len(pts) >= 5 else math.nan
        sae, hookpoint = t["sae"]
        source = encoder_display(t["record"]).get("explanations", "")
        ax.set(xlabel=f"{score} score (per latent)",
               ylabel="controlled Δlog p of the answer (lambada)\n< 0: harmful when spliced",
               title=f"{sae} @ {hookpoint}\nexplanations: {source}, judged by {t['record'].extra.get('judge', '?')}\n"
                     f"Spearman {rho:.2f}, {len(pts)} latents")
        ax.title.set_fontsize(8)
        fig.colorbar(sc, ax=ax, label="log10 firing frequency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_delphi(tables: list[dict[str, Any]], out: Path) -> list[Path]:
    """Each autointerp record's explanations and scores as delphi's run folder, one sub-folder per record."""
    written = []
    for t in tables:
        rec = t["record"]
        folder = out / Path(t["path"]).stem
        module = rec.hookpoint or "model"
        rows = _details(t["path"], rec)
        texts = {r["latent"]: r["explanation"] for r in rows if r.get("kind") == "latent"}
        written += write_explanations(folder, module, texts)
        examples = {(r["latent"], r["window"], r["quantile"]): r for r in rows if r.get("kind") == "example"}
        per: dict[str, dict[int, list[dict]]] = {}
        for a in (r for r in rows if r.get("kind") == "answer"):
            e = examples[(a["latent"], a["window"], a["quantile"])]
            toks = e["str_tokens"]
            item = {"str_tokens": toks, "activations": e["activations"],
                    "distance": a["quantile"] if a["quantile"] >= 0 else -1.0,
                    "activating": a["quantile"] >= 0, "prediction": a["prediction"], "probability": a["probability"],
                    "correct": None if a["prediction"] is None else a["prediction"] == a["label"],
                    "text": "".join(toks), "similarity": a["probability"],
                    "no_explanation": a.get("no_explanation", []), "explanation": a.get("explanation", [])}
            per.setdefault(a["scorer"], {}).setdefault(a["latent"], []).append(item)
        for scorer, latents in per.items():
            written += write_scores(folder, scorer, module, latents)
    return written


def write_jsonl(tables: list[dict[str, Any]], out: Path) -> list[Path]:
    """Each table's explanations with their scores, one JSONL per autointerp record, as llm_sim reads them
    (explanations=<file>&missing=skip&show_score=fuzzing: EleutherAI's "with fuzzing / detection score" rows)."""
    written = []
    for t in tables:
        path = out / f"{Path(t['path']).stem}.jsonl"
        lines = []
        for r in t["rows"]:
            scores = {s: r[s] for s in SCORE_COLUMNS if _num(r.get(s))}
            lines.append(json.dumps({"latent": r["latent"], "explanation": r["explanation"], "scores": scores}) + "\n")
        write_atomic(path, "".join(lines))
        written.append(path)
    return written
