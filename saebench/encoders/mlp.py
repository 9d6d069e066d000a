"""MLP encoders: a deeper amortised encoder in front of a dictionary (O'Neill et al. 2024, sections 3.3 and 5).

Spec forms (options after '?', see saebench.encoders.dictionary for the syntax):
- ``mlp:<encoder spec>``: an MLP trained against that encoder's frozen decoder dictionary, e.g.
  ``mlp:sae:default?hidden=576``; ``k`` defaults to the inner encoder's mean L0, so it is compared
  at equal sparsity;
- ``mlp``: with a task's known dictionary (synthetic data), trained against it; else trained jointly
  with a new decoder (unit-norm atoms, the paper's section 3.3).
- ``linear_sae`` is the paper's SAE: this family with no hidden layer, i.e. codes = ReLU(W x + b)
  (LinearSAEEncoder; on synthetic data, trained on the task's samples).

The encoder is hidden layers of ReLU(Linear) then a Linear to d_latent and ReLU (TopK when k > 0);
the loss is MSE (mean over dimensions) + l1 * mean |code| (the paper's MSE + L1 form, section 3.3; no
L1 term with TopK). Given a task's known codes (synthetic, known-codes regime) it regresses them
instead, by MSE or by cosine similarity (``codes_loss``; the paper's choice, section 3.5). Training
runs Adam on the corpus's training split at the hookpoint (or a task's training set) and is cached by
saebench.encoders.base.fit_cached.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saebench.encoders.base import (
    DECODER_DICTIONARY,
    FITS,
    LATENTS,
    BuildContext,
    Codes,
    EncodeContext,
    Encoder,
    EncoderSpec,
    TrainingSet,
)
from saebench.encoders.dictionary import (
    adam_steps,
    decode_with,
    family_options,
    least_squares_dictionary,
    mean_l0,
    resolve_dictionary,
    split_inner,
    unit_rows,
)
from saebench.errors import SaebenchError


@dataclass(frozen=True)
class MLPConfig:
    """Options of the mlp encoder (``mlp?hidden=256,256&k=32``)."""

    hidden: str = "auto"
    """Hidden widths, comma-separated ('256,256'); 'none' for no hidden layer; 'auto': one of width 4 x d_in."""
    k: int = -1
    """Active latents per token (TopK); -1: the inner encoder's mean L0 (rounded), or ReLU + L1 without one;
    0: ReLU + L1."""
    l1: float = 0.01
    """Weight of mean |code| in the loss when k is 0 (0.01: l1_weight of reconstruction_loss_with_l1 in the
    authors' experiments/utils.py, github.com/charlieoneill11/sparse-inference at commit 7b3e9d4)."""
    d_latent: int = 0
    """Width of a learned dictionary; 0: the task's (synthetic N), else 4 x d_in."""
    steps: int = 1000
    """Adam steps (1000 x 1024 is 5 epochs of the 200k training activations, as the default SAE)."""
    batch_size: int = 1024
    """Activations per step (full batch when the training set is no larger)."""
    train_tokens: int = 200_000
    """Training-split activations to learn from on a model (a task's own training set wins)."""
    lr: float = 1e-3
    """Adam learning rate (1e-3: the authors' experiments/known_Z.py and known_D.py, commit 02b2109)."""
    seed: int = -1
    """Initialisation and batch order; -1: the task's seed for the fit (0 in runs on a model)."""
    codes_loss: str = "mse"
    """Loss against known codes (a task's training set that carries them): 'mse', or 'cosine': 1 - the mean
    over latents of the cosine similarity of true and predicted codes across the batch's samples."""


DEAD_STEPS = 100
"""Steps without firing after which a TopK latent counts as dead and gets the auxiliary loss."""
AUX_WEIGHT = 1 / 32
"""Weight of the auxiliary (AuxK) loss (Gao et al. 2024)."""


def hidden_widths(text: str, d_in: int) -> list[int]:
    """'256,256' -> [256, 256]; 'none' -> []; 'auto' -> [4 * d_in]."""
    if text == "auto":
        return [4 * d_in]
    if text in ("none", "", "0"):
        return []
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise SaebenchError(f"mlp option hidden={text!r} must be positive widths separated by commas, or 'none'")
    return widths


def _linear_flops(widths: list[int]) -> float:
    return float(sum(2 * a * b for a, b in zip(widths, widths[1:])))


class MLPEncoder(Encoder):
    """An MLP encoder in front of a frozen or learned decoder dictionary."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY, FITS})
    fit_version = 2  # 2: TopK fits revive dead latents (AuxK), inputs scaled to unit mean square

    def __init__(self, name: str, arg: str | None, cfg: MLPConfig, build: BuildContext):
        inner_arg, _ = split_inner(arg) if name == "mlp" else (None, {})
        self.inner, self.dictionary = resolve_dictionary(inner_arg, build, name)
        d_in = build.d_in
        d_latent = (self.dictionary.W.shape[0] if self.dictionary is not None
                    else cfg.d_latent or build.d_latent or 4 * d_in)
        if cfg.k == -1:
            cfg = replace(cfg, k=round(mean_l0(self.inner, build))
                          if self.inner is not None else 0)
        if cfg.k > d_latent:
            raise SaebenchError(f"{name} option k={cfg.k} is larger than the dictionary's {d_latent} latents")
        for field in ("steps", "batch_size", "train_tokens"):
            if getattr(cfg, field) < 1:
                raise SaebenchError(f"{name} option {field} must be at least 1, not {getattr(cfg, field)}")
        if cfg.k < 0 or cfg.lr <= 0 or cfg.l1 < 0:
            raise SaebenchError(f"{name} options k and l1 must be non-negative and lr positive")
        if cfg.codes_loss not in ("mse", "cosine"):
            raise SaebenchError(f"{name} option codes_loss={cfg.codes_loss!r}: use mse or cosine")
        self.cfg, self.seed = cfg, cfg.seed if cfg.seed >= 0 else build.fit_seed
        self.train_tokens = cfg.train_tokens
        self.widths = [d_in, *hidden_widths(cfg.hidden, d_in), d_latent]
        gen = torch.Generator().manual_seed(self.seed)
        layers: list[nn.Module] = []
        for a, b in zip(self.widths, self.widths[1:]):
            layer = nn.Linear(a, b)
            bound = 1 / a ** 0.5  # nn.Linear's own init, drawn from the seeded generator
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
            layers += [layer, nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])  # the last ReLU (or TopK) is applied in _codes
        self.scale = 1.0  # root mean square of the training activations, set by fit
        if self.dictionary is None:
            self.W = unit_rows(torch.randn(d_latent, d_in, generator=gen))
            self.b = torch.zeros(d_in)
        else:
            self.W, self.b = self.dictionary.W, self.dictionary.b
        hookpoint = self.inner.spec.hookpoint if self.inner is not None else build.hookpoint
        source = self.dictionary.source if self.dictionary is not None else {"learned": True}
        params = asdict(cfg) | {"seed": self.seed, "hidden": self.widths[1:-1], "dictionary": source}
        if build.training is None or build.training.codes is None:
            del params["codes_loss"]  # read only when there are known codes: fits on a model keep their hash
        self.spec = EncoderSpec(name, arg, hookpoint, d_in, d_latent, params)
        self.encode_flops = _linear_flops(self.widths)
        self.training_context = self.inner.training_context if self.inner is not None else None

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "MLPEncoder":
        _, options = split_inner(arg)
        return cls("mlp", arg, family_options(MLPConfig(), options, build, "mlp"), build)


    @property
    def W_dec(self) -> Tensor:
        """(d_latent, d_in) decoder dictionary."""
        return self.W

    def _pre(self, acts: Tensor) -> Tensor:
        """Pre-activations: the net on activations scaled to unit mean square per dimension (a model's
        residual stream has norms in the hundreds; the net's initialisation expects inputs near 1)."""
        return self.net(acts / self.scale)

    def _codes(self, acts: Tensor, pre: Tensor | None = None) -> Tensor:
        pre = torch.relu(self._pre(acts) if pre is None else pre)
        if self.cfg.k:
            top = pre.topk(self.cfg.k, dim=1)
            pre = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
        return pre

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        self.net.to(acts.device)
        with torch.no_grad():
            return self._codes(acts.float())

    def decode(self, codes: Codes) -> Tensor:
        return decode_with(self.W, self.b, self.inner, codes)

    def fit(self, data: TrainingSet, progress: bool = True) -> None:
        acts = data.on_device()  # the model's device: a GPU where the run has one
        if data.codes is not None and self.dictionary is None:
            return self._fit_to_codes(acts, data.codes.to(acts.device), progress)
        learn = self.dictionary is None
        self.scale = float(acts.pow(2).mean().sqrt().clamp_min(1e-8))
        self.net.to(acts.device)
        W = self.W.to(acts.device).clone().requires_grad_(learn)
        b = (acts.mean(0) if learn else self.b.to(acts.device)).clone().requires_grad_(learn)
        params = list(self.net.parameters()) + ([W, b] if learn else [])

        idle = torch.zeros(W.shape[0], device=acts.device)  # steps since each latent last fired
        aux_k = max(1, self.widths[0] // 2)

        def loss_of(batch: Tensor) -> Tensor:
            pre = self._pre(batch)
            codes = self._codes(batch, pre)
            atoms = unit_rows(W) if learn else W
            err = batch - (codes @ atoms + b)
            if not self.cfg.k:
                return (err ** 2).mean() + self.cfg.l1 * codes.abs().mean()
            # TopK: latents that stop winning get no gradient and die; the auxiliary loss of Gao et al. (2024,
            # "Scaling and evaluating sparse autoencoders", AuxK, alpha = 1/32) has the dead latents' largest
            # pre-activations reconstruct the error, as sae-lens's TopK training does
            idle.add_(1).masked_fill_((codes != 0).any(0), 0)
            dead = idle > DEAD_STEPS
            loss = (err ** 2).mean()
            if dead.any():
                top = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, int(dead.sum())), dim=1)
                aux = torch.zeros_like(pre).scatter(1, top.indices, top.values)
                loss = loss + AUX_WEIGHT * ((aux @ atoms - err.detach()) ** 2).mean()
            return loss

        adam_steps(params, loss_of, acts, self.cfg.steps, self.cfg.batch_size, self.cfg.lr, self.seed, progress,
                   f"fitting {self.spec.label}")
        self.W, self.b = (unit_rows(W).detach(), b.detach()) if learn else (self.W, self.b)
        samples = self.cfg.steps * min(self.cfg.batch_size, len(acts))
        # backward ~ 2x forward (Kaplan et al. 2020): training = 3 x forward FLOPs x samples seen
        self.training_flops = 3.0 * (self.encode_flops + 2.0 * self.W.shape[0] * self.W.shape[1]) * samples

    def _fit_to_codes(self, acts: Tensor, codes: Tensor, progress: bool) -> None:
        """Known codes: regress them (MSE or cosine), and decode with the dictionary they imply by least squares."""
        self.scale = float(acts.pow(2).mean().sqrt().clamp_min(1e-8))
        self.net.to(acts.device)

        def loss_of(batch: Tensor) -> Tensor:
            pred, true = self._codes(acts[batch]), codes[batch]
            if self.cfg.codes_loss == "mse":
                return ((pred - true) ** 2).mean()
            # O'Neill et al. (section 3.5) regress known codes by cosine similarity, "more stable" than MSE; the
            # cosine is per latent across samples, averaged over latents, as cossim in the authors'
            # experiments/known_Z.py (commit 02b2109); 1 - cosine here, so a perfect fit is 0
            return 1 - F.cosine_similarity(pred, true, dim=0).mean()

        adam_steps(list(self.net.parameters()), loss_of,
                   torch.arange(len(acts), device=acts.device), self.cfg.steps, self.cfg.batch_size, self.cfg.lr,
                   self.seed, progress, f"fitting {self.spec.label} to known codes")
        self.W, self.b = least_squares_dictionary(codes, acts)
        samples = self.cfg.steps * min(self.cfg.batch_size, len(acts))
        self.training_flops = 3.0 * self.encode_flops * samples

    def fitted_state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "W": self.W, "b": self.b, "scale": self.scale,
                "training_flops": self.training_flops}

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.W, self.b, self.scale = state["W"], state["b"], state["scale"]
        self.training_flops = state["training_flops"]


class LinearSAEEncoder(MLPEncoder):
    """``linear_sae``: an SAE that saebench trains itself, codes = ReLU(W_enc x + b_enc) (TopK when k > 0) and a
    learned linear decoder: the SAE of O'Neill, Gumran & Klindt's amortisation-gap study, an MLP encoder with no
    hidden layer. On a task without a model (synthetic) it trains on the task's samples; sae-lens's SAEs are
    ``sae``."""

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "LinearSAEEncoder":
        _, options = split_inner(arg)
        if "hidden" in options:
            raise SaebenchError("linear_sae has no hidden layer; use mlp?hidden=... for an MLP encoder")
        cfg = family_options(MLPConfig(), options, build, "linear_sae")
        return cls("linear_sae", arg, replace(cfg, hidden="none"), build)
