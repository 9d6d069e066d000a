"""The embedded default SAE: a sae-lens TopK SAE trained by saebench on the embedded text.

No SAE exists for the embedded model, so saebench trains one with sae-lens's own trainer on
the training split of the embedded Wikipedia text (never on the evaluation split), caches it
under the saebench cache, and reuses it. Attention sinks (position 0 and BOS tokens, residual
norm ~100x the median) are left out of training, as they are passed through at evaluation.
"""

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from saebench.corpus import CorpusSpec, token_contexts
from saebench.encoders.base import BuildContext, TrainingSet
from saebench.encoders.specs import apply_options
from saebench.errors import SaebenchError
from saebench.models import cache_dir, publish_dir
from saebench.presets import load_presets
from saebench.records import config_hash
from saebench.splice import SpliceConfig, sink_mask
from saebench.tasks.base import TaskContext

if TYPE_CHECKING:
    from saebench.models import LoadedModel


@dataclass(frozen=True)
class DefaultSAEConfig:
    """How the default SAE is trained (registry/encoders.yaml, key sae_default)."""

    expansion: int = 4
    """d_sae = expansion x d_model."""
    k: int = 32
    """Active latents per token (TopK)."""
    train_tokens: int = 200_000
    """Activations collected from the training split (sinks excluded)."""
    context_len: int = 128
    """Tokens per training context, BOS included."""
    epochs: int = 5
    """Passes over the collected activations."""
    batch_size: int = 1024
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate; decays linearly to lr/10 over the last fifth of training."""
    dead_window: int = 100
    """Steps without firing after which a latent counts as dead and gets the TopK auxiliary loss."""
    outlier_factor: float = 10.0
    """Activations with norm above this multiple of the median are left out of training (sink-like)."""
    seed: int = 0
    """Training seed (which training contexts, initialisation, batch order); `--seed` does not change it."""
    architecture: str = "topk"
    """'topk' (k active latents per token) or 'standard' (ReLU with an L1 penalty: its L0 is free to
    grow, as the L1 SAEs of Anders & Bloom's context-length study did)."""
    l1_coefficient: float = 5.0
    """L1 penalty of a 'standard' SAE (sae-lens's l1_coefficient, on activations normalised to norm sqrt(d_in))."""


ADDED_FIELDS = {"architecture": "topk", "l1_coefficient": 5.0}
"""Settings added after SAEs were first cached: they name a cached SAE only when they differ from
these values, so the SAEs cached before them stay valid."""
ARCHITECTURES = ("topk", "standard")


def default_sae_config(options: dict[str, str] | None = None) -> DefaultSAEConfig:
    """The preset's training settings (registry/encoders.yaml) with `options` from the spec applied."""
    cfg = DefaultSAEConfig(**load_presets("registry", "encoders").get("sae_default", {}).get("train", {}))
    cfg = apply_options(cfg, options or {}, "sae:default")
    for name in ("expansion", "k", "train_tokens", "epochs", "batch_size", "dead_window"):
        if getattr(cfg, name) < 1:
            raise SaebenchError(f"sae:default option {name} must be at least 1, not {getattr(cfg, name)}")
    if cfg.context_len < 2:
        raise SaebenchError(f"sae:default option context_len must be at least 2, not {cfg.context_len}")
    if not (cfg.lr > 0 and cfg.outlier_factor > 0 and cfg.l1_coefficient > 0):
        raise SaebenchError("sae:default options lr, outlier_factor and l1_coefficient must be positive")
    if cfg.architecture not in ARCHITECTURES:
        raise SaebenchError(f"sae:default option architecture={cfg.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    return cfg


def _key_settings(cfg: DefaultSAEConfig) -> dict:
    """The training settings that name a cached SAE (ADDED_FIELDS only where they differ from their defaults)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}


def default_sae_dir(build: BuildContext, options: dict[str, str] | None = None) -> Path:
    """Folder of the cached default SAE for `build.model`, training it first when absent.

    Args:
        options: training settings that differ from the preset (``sae:default?context_len=1024``).
    """
    model = build.model
    cfg = default_sae_config(options)
    limit = model.max_positions
    if limit and cfg.context_len > limit:
        raise SaebenchError(f"sae:default option context_len={cfg.context_len} is longer than model "
                            f"{model.name!r} supports ({limit} positions)")
    hookpoint = model.hookpoint(build.hookpoint or model.default_hookpoint or
                                f"layers.{len(model.layers()) // 2}.resid_post")
    # The model's dtype is deliberately not in the key: the SAE trains in float32 on activations
    # collected in whatever dtype the model runs in (dtype 'auto' picks bf16 or float32 by CPU
    # kind), and bf16 rounding of the activations (~0.4% relative) is far below the SAE's own
    # reconstruction error, so one cached SAE serves both. Records identify it by weights_sha256.
    key = config_hash({"model": model.model_id, "revision": model.revision, "hookpoint": hookpoint.name,
                       "train": _key_settings(cfg)})
    path = Path(build.cache_dir or cache_dir()) / "saes" / f"default-{hookpoint.name}-{key}"
    if not (path / "cfg.json").exists():
        _train(build, hookpoint, cfg, path)
    return path


class CorpusTrainingSet(TrainingSet):
    """Activations at a hookpoint over the training split of the embedded text (never the evaluation
    split), sinks and sink-sized outliers left out; collected once per process."""

    def __init__(self, model: "LoadedModel", hookpoint: str, tokens: int, context_len: int, seed: int,
                 outlier_factor: float, progress: bool):
        self.model, self.hookpoint = model, model.hookpoint(hookpoint)
        self.tokens, self.context_len, self.seed, self.outlier_factor = tokens, context_len, seed, outlier_factor
        self.progress = progress
        self.key = {"model": model.model_id, "revision": model.revision, "dtype": model.dtype,
                    "hookpoint": self.hookpoint.name, "corpus": "wiki:train", "tokens": tokens,
                    "context_len": context_len, "seed": seed, "outlier_factor": outlier_factor}
        self._acts: torch.Tensor | None = None

    def activations(self) -> torch.Tensor:
        if self._acts is None:
            ctx = TaskContext(self.model, self.hookpoint, CorpusSpec("wiki", "train"), self.seed, 16, SpliceConfig(),
                              None, None)
            tokens = token_contexts(self.model.tokenizer, ctx.corpus, self.context_len,
                                    self.tokens * self.context_len // (self.context_len - 1), self.seed,
                                    self.model.bos_id)
            acts = _collect(ctx, tokens, self.progress)
            # Besides position 0 and BOS, a few dozen tokens per 200k carry sink-sized norms (up to
            # ~27,000 vs a median ~170 at layer 15); left in, they dominate the MSE and an encoder learns
            # them instead of the ordinary tokens. They are still spliced and scored at evaluation.
            norms = acts.norm(dim=1)
            self._acts = acts[norms <= self.outlier_factor * norms.median()]
        return self._acts


_TRAINING_SETS: dict[tuple, CorpusTrainingSet] = {}


def corpus_training_set(model: "LoadedModel", hookpoint: str | None, progress: bool = True, tokens: int = 200_000,
                        context_len: int = 128, seed: int = 0, outlier_factor: float = 10.0) -> CorpusTrainingSet:
    """The training activations at `hookpoint` (default: the model preset's), shared by every encoder of the
    process that trains there (the defaults are the default SAE's)."""
    name = model.hookpoint(hookpoint or model.default_hookpoint or f"layers.{len(model.layers()) // 2}.resid_post").name
    key = (id(model), name, tokens, context_len, seed, outlier_factor)
    if key not in _TRAINING_SETS:
        _TRAINING_SETS[key] = CorpusTrainingSet(model, name, tokens, context_len, seed, outlier_factor, progress)
    return _TRAINING_SETS[key]


def _collect(ctx: TaskContext, tokens: torch.Tensor, progress: bool) -> torch.Tensor:
    """(n, d_model) float32 activations at ctx.hookpoint of every non-sink token."""
    chunks = []
    for start in tqdm(range(0, len(tokens), ctx.batch_size), desc="collecting activations",
                      disable=not progress, unit="batch"):
        batch = tokens[start:start + ctx.batch_size]
        acts = ctx.capture(batch).float().cpu()
        chunks.append(acts[~sink_mask(batch, ctx.model.bos_id)])
    return torch.cat(chunks)


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled minibatches, reshuffled every epoch, forever (the trainer counts samples)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def _train(build: BuildContext, hookpoint, cfg: DefaultSAEConfig, dest: Path) -> None:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    model = build.model
    print(f"saebench: training the default SAE for {model.name} at {hookpoint.name} "
          f"(once; cached in {dest})", flush=True)
    torch.manual_seed(cfg.seed)
    acts = corpus_training_set(model, hookpoint.name, build.progress, cfg.train_tokens, cfg.context_len, cfg.seed,
                               cfg.outlier_factor).activations()
    total = cfg.epochs * len(acts)
    if cfg.architecture == "topk":
        config_cls, sae_cls, specific = TopKTrainingSAEConfig, TopKTrainingSAE, {"k": cfg.k}
    else:
        config_cls, sae_cls, specific = StandardTrainingSAEConfig, StandardTrainingSAE, {
            "l1_coefficient": cfg.l1_coefficient, "l1_warm_up_steps": total // cfg.batch_size // 20}
    sae_cfg = config_cls(
        d_in=model.d_model, d_sae=cfg.expansion * model.d_model, **specific, dtype="float32", device="cpu",
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(
            model_name=model.model_id, hook_name=hookpoint.transformer_lens_name, context_size=cfg.context_len,
            prepend_bos=True, dataset_path="gensim enwiki sample, saebench train split",
            saebench_hookpoint=hookpoint.name, training_tokens=len(acts), tokens_seen=total,
            saebench_train_config=asdict(cfg), exclude_special_tokens=True,
        ),
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
        lr_decay_steps=total // cfg.batch_size // 5, device="cpu", logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=20, dead_feature_window=cfg.dead_window, feature_sampling_window=2000,
    )
    sae = sae_cls(sae_cfg)
    SAETrainer(trainer_cfg, sae, _batches(acts, cfg.batch_size, cfg.seed)).fit()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        sae.save_inference_model(tmp)
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
