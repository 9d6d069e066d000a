"""The default SAE (``sae:default``): a sae-lens SAE (TopK unless ``?architecture=`` says otherwise) that saebench
trains on the run's corpus.

No SAE exists for the embedded model, so saebench trains one with sae-lens's own trainer on
the training split of the run's corpus (the embedded Wikipedia text by default; never the
evaluation split), on the run's device, caches it under the saebench cache, and reuses it.
Attention sinks (position 0 and BOS tokens, residual norm ~100x the median) are left out of
training, as they are passed through at evaluation.
"""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saebench.capture import DEFAULT_CORPUS, CorpusTrainingSet, corpus_training_set, default_hookpoint_name
from saebench.encoders.base import BuildContext
from saebench.encoders.specs import apply_options
from saebench.errors import SaebenchError
from saebench.models import cache_dir, publish_dir
from saebench.presets import load_presets
from saebench.records import config_hash


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
    """One of ARCHITECTURES, each trained by sae-lens's own training SAE class: 'topk' (k active latents per
    token), 'batchtopk' (k per token on average over a batch), 'standard' (ReLU with an L1 penalty: its L0 is
    free to grow, as the L1 SAEs of Anders & Bloom's context-length study did), 'gated' (a gate and a
    magnitude path, L1 on the gate), 'jumprelu' (a learned threshold per latent, an L0 penalty)."""
    l1_coefficient: float = 5.0
    """L1 penalty of a 'standard' or 'gated' SAE (sae-lens's l1_coefficient, on activations normalised to norm
    sqrt(d_in))."""
    l0_coefficient: float = 1.0
    """L0 penalty of a 'jumprelu' SAE (sae-lens's l0_coefficient and its default, 'step' sparsity loss:
    coefficient x active latents per token, beside an MSE summed over d_in on activations normalised to norm
    sqrt(d_in))."""


ADDED_FIELDS = {"architecture": "topk", "l1_coefficient": 5.0, "l0_coefficient": 1.0}
"""Settings added after SAEs were first cached: they name a cached SAE only when they differ from
these values, so the SAEs cached before them stay valid."""
ARCHITECTURES = ("topk", "batchtopk", "standard", "gated", "jumprelu")
SPARSITY_OPTIONS = {"k": ("topk", "batchtopk"), "l1_coefficient": ("standard", "gated"),
                    "l0_coefficient": ("jumprelu",)}
"""The option that sets each architecture's sparsity: given for another architecture it would do nothing."""


def default_sae_config(options: dict[str, str] | None = None) -> DefaultSAEConfig:
    """The preset's training settings (registry/encoders.yaml) with `options` from the spec applied."""
    cfg = DefaultSAEConfig(**load_presets("registry", "encoders").get("sae_default", {}).get("train", {}))
    cfg = apply_options(cfg, options or {}, "sae:default")
    for name in ("expansion", "k", "train_tokens", "epochs", "batch_size", "dead_window"):
        if getattr(cfg, name) < 1:
            raise SaebenchError(f"sae:default option {name} must be at least 1, not {getattr(cfg, name)}")
    if cfg.context_len < 2:
        raise SaebenchError(f"sae:default option context_len must be at least 2, not {cfg.context_len}")
    if not (cfg.lr > 0 and cfg.outlier_factor > 0 and cfg.l1_coefficient > 0 and cfg.l0_coefficient > 0):
        raise SaebenchError("sae:default options lr, outlier_factor, l1_coefficient and l0_coefficient must be "
                            "positive")
    if cfg.architecture not in ARCHITECTURES:
        raise SaebenchError(f"sae:default option architecture={cfg.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    for name in options or {}:  # only options the user gave: the preset's k is no contradiction
        if name in SPARSITY_OPTIONS and cfg.architecture not in SPARSITY_OPTIONS[name]:
            archs = " or ".join(SPARSITY_OPTIONS[name])
            raise SaebenchError(f"sae:default option {name} applies to architecture {archs}, not {cfg.architecture}; "
                                f"{_sparsity_hint(cfg.architecture)}")
    return cfg


def _sparsity_hint(architecture: str) -> str:
    """Which option sets the sparsity of `architecture`."""
    option = next(name for name, archs in SPARSITY_OPTIONS.items() if architecture in archs)
    return f"{architecture} takes {option}="


def _key_settings(cfg: DefaultSAEConfig) -> dict:
    """The training settings that name a cached SAE (ADDED_FIELDS only where they differ from their defaults)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}


def default_sae_dir(build: BuildContext, options: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Folder of the cached default SAE for `build.model`, training it first when absent, and the key of the
    training set it learned from.

    Args:
        options: training settings that differ from the preset (``sae:default?context_len=1024``).
    """
    model = build.model
    cfg = default_sae_config(options)
    limit = model.max_positions
    if limit and cfg.context_len > limit:
        raise SaebenchError(f"sae:default option context_len={cfg.context_len} is longer than model "
                            f"{model.name!r} supports ({limit} positions)")
    hookpoint = model.hookpoint(default_hookpoint_name(model, build.hookpoint))
    if cfg.architecture in SPARSITY_OPTIONS["k"] and cfg.k > cfg.expansion * model.d_model:
        raise SaebenchError(f"sae:default option k={cfg.k} is more than its {cfg.expansion * model.d_model} latents "
                            f"(expansion {cfg.expansion} x d_model {model.d_model})")
    # The model's dtype is deliberately not in the key: the SAE trains in float32 on activations
    # collected in whatever dtype the model runs in (dtype 'auto' picks bf16 or float32 by CPU
    # kind), and bf16 rounding of the activations (~0.4% relative) is far below the SAE's own
    # reconstruction error, so one cached SAE serves both. Records identify it by weights_sha256.
    named = {"model": model.model_id, "revision": model.revision, "hookpoint": hookpoint.name,
             "train": _key_settings(cfg)}
    if build.corpus != DEFAULT_CORPUS:  # SAEs cached before the corpus was followed were all trained on wiki
        named["corpus"] = build.corpus
    path = Path(build.cache_dir or cache_dir()) / "saes" / f"default-{hookpoint.name}-{config_hash(named)}"
    data = training_set(build, hookpoint.name, cfg)
    if not (path / "cfg.json").exists():
        _train(build, hookpoint, cfg, data, path)
    return path, data.key


def training_set(build: BuildContext, hookpoint: str, cfg: DefaultSAEConfig) -> CorpusTrainingSet:
    """The activations the default SAE with `cfg` trains on at `hookpoint`: the run's corpus and batch size."""
    return corpus_training_set(build.model, hookpoint, build.corpus, build.batch_size, build.progress,
                               cfg.train_tokens, cfg.context_len, cfg.seed, cfg.outlier_factor)


@contextmanager
def _trainer_progress(shown: bool) -> Iterator[None]:
    """sae-lens's trainer always draws a progress bar and has no setting to hide it; under --quiet its module's
    tqdm is swapped for a disabled one while it trains."""
    if shown:
        yield
        return
    from sae_lens.training import sae_trainer

    original = sae_trainer.tqdm
    sae_trainer.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = original


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled minibatches, reshuffled every epoch, forever (the trainer counts samples)."""
    if len(acts) < batch_size:  # no whole batch: the loop below would spin forever
        raise SaebenchError(f"the default SAE's training set holds {len(acts)} activations, fewer than one batch of "
                            f"{batch_size}; raise train_tokens or lower batch_size (sae:default?batch_size=...)")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def _architecture(cfg: DefaultSAEConfig, steps: int) -> tuple[type, type, dict]:
    """sae-lens's training SAE config class, SAE class and sparsity settings for `cfg.architecture`.

    A penalty (L1 or L0) ramps up linearly over the first 5% of the `steps` optimiser steps (what the standard
    SAE here has always done). A BatchTopK SAE is saved by sae-lens as a JumpReLU SAE whose threshold is
    its learned global threshold (a moving average of the smallest kept activation), so a briefly trained
    one keeps more than k latents per token at inference.
    """
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    classes = {"topk": (TopKTrainingSAEConfig, TopKTrainingSAE),
               "batchtopk": (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE),
               "standard": (StandardTrainingSAEConfig, StandardTrainingSAE),
               "gated": (GatedTrainingSAEConfig, GatedTrainingSAE),
               "jumprelu": (JumpReLUTrainingSAEConfig, JumpReLUTrainingSAE)}
    if cfg.architecture in SPARSITY_OPTIONS["k"]:
        specific: dict = {"k": cfg.k}
    elif cfg.architecture in SPARSITY_OPTIONS["l0_coefficient"]:
        specific = {"l0_coefficient": cfg.l0_coefficient, "l0_warm_up_steps": steps // 20}
    else:
        specific = {"l1_coefficient": cfg.l1_coefficient, "l1_warm_up_steps": steps // 20}
    return (*classes[cfg.architecture], specific)


def _train(build: BuildContext, hookpoint, cfg: DefaultSAEConfig, data: CorpusTrainingSet, dest: Path) -> None:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    model = build.model
    device = str(model.device)
    print(f"saebench: training the default SAE for {model.name} at {hookpoint.name} on {device} "
          f"(once; cached in {dest})", flush=True)
    torch.manual_seed(cfg.seed)
    acts = data.on_device()
    total = cfg.epochs * len(acts)
    config_cls, sae_cls, specific = _architecture(cfg, total // cfg.batch_size)
    sae_cfg = config_cls(
        d_in=model.d_model, d_sae=cfg.expansion * model.d_model, **specific, dtype="float32", device=device,
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(
            model_name=model.model_id, hook_name=hookpoint.transformer_lens_name, context_size=cfg.context_len,
            prepend_bos=True, dataset_path=f"{data.key['corpus']} (saebench's train split)",
            saebench_hookpoint=hookpoint.name, training_tokens=len(acts), tokens_seen=total,
            saebench_train_config=asdict(cfg), exclude_special_tokens=True,
        ),
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
        lr_decay_steps=total // cfg.batch_size // 5, device=device, logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=20, dead_feature_window=cfg.dead_window, feature_sampling_window=2000,
    )
    sae = sae_cls(sae_cfg)
    with _trainer_progress(build.progress):
        SAETrainer(trainer_cfg, sae, _batches(acts, cfg.batch_size, cfg.seed)).fit()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        sae.save_inference_model(tmp)
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
