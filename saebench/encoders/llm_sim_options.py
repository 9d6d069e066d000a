"""The options of ``llm_sim:<encoder spec>?...`` and their checks (tasks that ask an llm_sim encoder the
same questions, such as latent_recall's `candidates`, check their parameters with these too)."""

from dataclasses import dataclass
from typing import Any

from saebench.errors import SaebenchError
from saebench.latent_examples import SAMPLINGS

VALUES = ("oracle", "oracle_fp", "predicted")
"""llm_sim's `values` settings."""

ADDED_OPTIONS = {"explain_sampling": "quantiles", "explain_examples": 40, "show_score": ""}
"""Options added after llm_sim's first records, left out of its spec at these defaults (the records keep their keys)."""
NEVER_ACTIVE = "This feature was never seen active."
"""The explanation of a latent the training sample never activates (explanations=generate or tokens)."""


@dataclass(frozen=True)
class LLMSimConfig:
    """Options of ``llm_sim:<encoder spec>?...``."""

    llm: str = ""
    """Simulator: 'rules' (token baseline), or an LLM (a model preset/hub id/path; with a server, its model
    name); default: the embedded smollm2-135m in process, or the server's first model."""
    llm_url: str = ""
    """Base URL of an OpenAI-compatible server (also --llm-url)."""
    backend: str = "auto"
    """'auto', 'transformers', 'server' or 'vllm' (see saebench.llm)."""
    explanations: str = ""
    """A JSONL file, a delphi output folder, 'explainer' (001's), 'generate' (saebench's first explainer) or
    'tokens'; default 'tokens' for llm=rules, else 'explainer'."""
    explain_sampling: str = "quantiles"
    """How explanations=explainer draws its examples: 'quantiles', 'top' or 'random' (001's Fig. 3)."""
    explain_examples: int = 40
    """Activating examples explanations=explainer shows (delphi's n_examples_train)."""
    show_score: str = ""
    """Say each explanation's score of this name (a JSONL file's "scores", e.g. fuzzing or detection, as
    `saebench latents --jsonl` writes them) in every simulation prompt; '' (default) says none."""
    delphi_module: str = ""
    """Which module's explanations to read from a delphi folder holding several (e.g. 'layers.15')."""
    missing: str = "error"
    """Latents without an explanation: 'error', or 'skip' (they are never candidates; the record counts them)."""
    candidates: str = "200"
    """Random inactive candidate latents per token, or 'all' (every latent is a candidate)."""
    predict: str = "threshold"
    """'threshold' (P >= threshold) or 'top' (the |A| most probable candidates)."""
    threshold: float = 0.5
    values: str = "oracle"
    """'oracle' (true activations, false positives 0), 'oracle_fp' (false positives at their median activation)
    or 'predicted' (the simulator's 0-9 via quantiles)."""
    sample_tokens: int = 65_536
    """Training-split tokens on which latents are characterised (explanations, quantiles, baseline)."""
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 4
    seed: int = 0
    """Seed of the random inactive candidates (each token's draw depends only on it and the token's text)."""


def check_options(cfg: LLMSimConfig) -> None:
    """One clear error for the first option of `cfg` that is out of range or contradicts another."""
    if cfg.predict not in ("threshold", "top"):
        raise SaebenchError(f"llm_sim option predict={cfg.predict!r}: choose threshold or top")
    if cfg.values not in VALUES:
        raise SaebenchError(f"llm_sim option values={cfg.values!r}: choose one of {', '.join(VALUES)}")
    if cfg.missing not in ("error", "skip"):
        raise SaebenchError(f"llm_sim option missing={cfg.missing!r}: choose error or skip")
    check_candidates(cfg.candidates, "llm_sim option")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise SaebenchError(f"llm_sim option threshold={cfg.threshold}: must be between 0 and 1")
    if cfg.llm == "rules" and cfg.explanations not in ("", "tokens"):
        raise SaebenchError("llm=rules matches token lists: use it with explanations=tokens")
    if cfg.explain_sampling not in SAMPLINGS:
        raise SaebenchError(f"llm_sim option explain_sampling={cfg.explain_sampling!r}: choose {', '.join(SAMPLINGS)}")
    if cfg.show_score and (cfg.llm == "rules" or cfg.explanations in ("", "generate", "explainer", "tokens")):
        raise SaebenchError(f"llm_sim option show_score={cfg.show_score!r} reads scores from an explanations file "
                            "(saebench latents --jsonl writes one); give explanations=<file> and an LLM simulator")
    if cfg.explain_examples < 1:
        raise SaebenchError(f"llm_sim option explain_examples={cfg.explain_examples}: give at least 1")


def check_candidates(value: Any, where: str) -> str:
    """`value` as a candidates setting ('all' or a count of inactive latents, as text); else one clear error
    naming `where` ('llm_sim option', 'latent_recall parameter')."""
    text = str(value).strip()
    if text != "all" and not text.isdigit():
        raise SaebenchError(f"{where} candidates={value!r}: give a count of inactive latents or 'all'")
    return text if text == "all" else str(int(text))
