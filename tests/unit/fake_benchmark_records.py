"""Fake lambada records with per-item and per-latent details rows, for drawing the per-item plots without a model."""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "leaderboards" / "records" / "lambada"
"""Committed lambada records: one is the template (schema, task spec, model) the fakes are made from."""
OUTCOMES = {(True, True): "both_correct", (False, False): "both_wrong", (True, False): "only_clean_correct",
            (False, True): "only_spliced_correct"}


def _item(rng: random.Random, k: int, layer: int) -> dict:
    clean = rng.random() < 0.3
    delta = rng.gauss(-0.1 * layer, 1.0)
    right = clean if abs(delta) < 1.5 else delta > 0
    logp_clean = -abs(rng.gauss(3.0, 2.0))
    return {"item": k, "doc_id": k, "kind": "item", "correct": right, "correct_clean": clean, "correct_zero": False,
            "logp": logp_clean + delta, "logp_clean": logp_clean, "logp_zero": -20.0, "delta_logp": delta,
            "ce_prompt": 4.0, "outcome": OUTCOMES[(clean, right)], "n_positions": 40,
            "mse": abs(rng.gauss(0.05 * (layer + 1), 0.02)), "l0": rng.uniform(20, 60),
            "norm": rng.gauss(2.0 + layer, 0.3)}


def _feature(rng: random.Random, f: int, layer: int) -> dict:
    n = rng.randint(1, 200)
    score = sum(1 if rng.random() < 0.3 else -1 for _ in range(n))
    return {"kind": "feature", "feature": f, "n_prompts": n, "mean_delta_logp": rng.gauss(-0.1 * layer, 0.5),
            "score": score, "controlled_delta_logp": None, "controlled_se": None}


def write_fake_records(folder: Path, layers=(0, 3, 6), items: int = 300, latents: int = 400, seed: int = 0) -> Path:
    """lambada v2 records of `sae:default` at each layer, with details files; returns the runs folder."""
    rng = random.Random(seed)
    template = json.loads(sorted(RECORDS.glob("*.json"))[0].read_text())
    template["encoder"] |= {"name": "sae", "arg": "default", "label": "sae:default", "d_latent": 2304}
    out = folder / "lambada"
    out.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        hookpoint = f"layers.{layer}.resid_post"
        rows = [_item(rng, k, layer) for k in range(items)] + [_feature(rng, f, layer) for f in range(latents)]
        acc = sum(r["correct"] for r in rows[:items]) / items
        acc_clean = sum(r["correct_clean"] for r in rows[:items]) / items
        rec = json.loads(json.dumps(template))
        name = f"sae_default-{layer:016x}"
        rec["task"]["version"] = 2
        rec["hookpoint"] = rec["encoder"]["hookpoint"] = rec["config"]["hookpoint"] = hookpoint
        rec["config_hash"] = f"{layer:016x}"
        rec["metrics"] |= {"acc": acc, "acc_clean": acc_clean, "ce_prompt": 4.0 + 0.1 * layer, "ce_prompt_clean": 3.9}
        rec["details_file"] = f"{name}.details.jsonl"
        (out / f"{name}.json").write_text(json.dumps(rec))
        (out / rec["details_file"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
