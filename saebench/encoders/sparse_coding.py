"""Sparse coding: codes inferred per token by optimisation, on a given or learned dictionary.

``sparse_coding[:<encoder spec>]?method=fista|ista|topk&l1=0.01&k=32&iters=100``:
- ``ista`` / ``fista``: non-negative L1 sparse inference, minimising per token
  mean_dims((x - b - s W)^2) + l1 * mean_latents(|s|), s >= 0 (the MSE + L1 loss of O'Neill et al.
  2024), by proximal gradient steps of size 1 / Lipschitz (ISTA; Beck & Teboulle 2009's FISTA adds
  momentum);
- ``topk``: gradient steps projected onto codes with at most k non-negative entries (normalised
  iterative hard thresholding; Blumensath & Davies 2010), k defaulting to the inner encoder's mean
  L0 so it is compared at equal sparsity.
The dictionary is an inner encoder's decoder (``sparse_coding:sae:default``), a task's known
dictionary (synthetic data), or learned by saebench: alternating code inference and an Adam step on
unit-norm atoms, on the corpus's training split (or the task's training set), cached like every fit.

Written here on torch (batched, CPU or CUDA): scikit-learn's SparseCoder / dict_learning are numpy,
without non-negative FISTA or a top-k projection, and would copy every chunk off the device.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

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

METHODS = ("ista", "fista", "topk")
CHUNK = 4096
"""Tokens per inference chunk."""


@dataclass(frozen=True)
class SparseCodingConfig:
    """Options of the sparse_coding encoder."""

    method: str = "fista"
    """'ista', 'fista' or 'topk'."""
    l1: float = 0.01
    """Weight of mean |code| against the MSE (ista, fista)."""
    k: int = 0
    """Active latents per token (topk); 0: the inner encoder's mean L0, else the task's sparsity."""
    iters: int = 100
    """Proximal gradient iterations per token at inference."""
    d_latent: int = 0
    """Width of a learned dictionary; 0: the task's (synthetic N), else 4 x d_in."""
    steps: int = 2000
    """Dictionary-learning steps (each: infer the batch's codes, one Adam step on the dictionary)."""
    fit_iters: int = 10
    """Inference iterations per dictionary step when the whole training set is one batch (its codes are
    kept from step to step, so a few iterations suffice); else `iters` from zero."""
    batch_size: int = 1024
    """Activations per dictionary step."""
    train_tokens: int = 200_000
    """Training-split activations to learn from on a model (a task's own training set wins)."""
    lr: float = 1e-3
    """Adam learning rate of the dictionary."""
    seed: int = -1
    """Initialisation and batch order of a learned dictionary; -1: the task's seed for the fit (0 on a model)."""


def lipschitz(W: Tensor) -> float:
    """Largest eigenvalue of W W^T: the Lipschitz constant of the gradient of 0.5 |x - s W|^2."""
    return float(torch.linalg.eigvalsh(W.T.double() @ W.double())[-1].clamp_min(1e-12))


def infer(x: Tensor, W: Tensor, b: Tensor, cfg: SparseCodingConfig, k: int, iters: int,
          start: Tensor | None = None, step_size: float | None = None) -> Tensor:
    """(tokens, d_latent) non-negative codes of `x` on dictionary (W, b) after `iters` iterations."""
    target = x.float() - b
    s = torch.zeros(len(x), W.shape[0], device=x.device) if start is None else start.clone()
    if cfg.method == "topk":
        return _normalised_iht(target, W, s, k, iters)
    step = step_size if step_size is not None else 1.0 / lipschitz(W)
    # 0.5 |r|^2 + lam |s|_1 is the paper's loss times d_in / 2: lam = l1 * d_in / (2 * d_latent)
    lam = cfg.l1 * W.shape[1] / (2 * W.shape[0])
    y, t = s, 1.0
    for _ in range(iters):
        grad = (y @ W - target) @ W.T
        nxt = (y - step * grad - step * lam).clamp_min(0)  # gradient step, then non-negative soft threshold
        if cfg.method == "ista":
            y = s = nxt
            continue
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2  # FISTA momentum (Beck & Teboulle 2009)
        y = nxt + ((t - 1) / t_next) * (nxt - s)
        s, t = nxt, t_next
    return s


def _normalised_iht(target: Tensor, W: Tensor, s: Tensor, k: int, iters: int) -> Tensor:
    """Non-negative normalised iterative hard thresholding (Blumensath & Davies 2010): a gradient step whose
    size is the exact line search on the current support (at the start: the k steepest descent entries),
    then the k largest non-negative entries kept. A fixed 1/Lipschitz step stalls on overcomplete dictionaries."""
    for _ in range(iters):
        grad = (s @ W - target) @ W.T
        on = s != 0
        first = torch.zeros_like(on).scatter_(1, (-grad).topk(k, dim=1).indices, True)
        on = torch.where(on.any(1, keepdim=True), on, first)
        g = grad * on
        mu = (g ** 2).sum(1, keepdim=True) / ((g @ W) ** 2).sum(1, keepdim=True).clamp_min(1e-12)
        top = (s - mu * grad).clamp_min(0).topk(k, dim=1)
        s = torch.zeros_like(s).scatter_(1, top.indices, top.values)
    return s


class SparseCodingEncoder(Encoder):
    """Codes by proximal-gradient sparse inference on a dictionary."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY, FITS})

    def __init__(self, arg: str | None, cfg: SparseCodingConfig, build: BuildContext):
        inner_arg, _ = split_inner(arg)
        if cfg.method not in METHODS:
            raise SaebenchError(f"sparse_coding option method={cfg.method!r}: use one of {', '.join(METHODS)}")
        for field in ("iters", "steps", "batch_size", "fit_iters", "train_tokens"):
            if getattr(cfg, field) < 1:
                raise SaebenchError(f"sparse_coding option {field} must be at least 1, not {getattr(cfg, field)}")
        if cfg.k < 0 or cfg.l1 < 0 or cfg.lr <= 0:
            raise SaebenchError("sparse_coding options k and l1 must be non-negative and lr positive")
        self.inner, self.dictionary = resolve_dictionary(inner_arg, build, "sparse_coding")
        if self.dictionary is not None:  # inference on a given dictionary learns nothing: the cost is the inner's
            self.capabilities = self.capabilities - {FITS}
            self.training_flops = self.inner.training_flops if self.inner is not None else 0.0
        d_in = build.d_in
        d_latent = (self.dictionary.W.shape[0] if self.dictionary is not None
                    else cfg.d_latent or build.d_latent or 4 * d_in)
        if cfg.method == "topk" and cfg.k == 0:
            if self.inner is None:
                raise SaebenchError("sparse_coding?method=topk needs k (e.g. &k=32) without an inner encoder")
            cfg = replace(cfg, k=max(1, round(mean_l0(self.inner, build))))
        if cfg.k > d_latent:
            raise SaebenchError(f"sparse_coding option k={cfg.k} is larger than the dictionary's {d_latent} latents")
        self.cfg, self.seed = cfg, cfg.seed if cfg.seed >= 0 else build.fit_seed
        self.train_tokens = cfg.train_tokens
        if self.dictionary is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.W, self.b = unit_rows(torch.randn(d_latent, d_in, generator=gen)), torch.zeros(d_in)
        else:
            self.W, self.b = self.dictionary.W, self.dictionary.b
        self.step_size = 1.0 / lipschitz(self.W)
        hookpoint = self.inner.spec.hookpoint if self.inner is not None else build.hookpoint
        source = self.dictionary.source if self.dictionary is not None else {"learned": True}
        self.spec = EncoderSpec("sparse_coding", arg, hookpoint, d_in, d_latent,
                                asdict(cfg) | {"seed": self.seed, "dictionary": source})
        # per iteration s W and r W^T (and g W for the top-k line search)
        self.encode_flops = (6.0 if cfg.method == "topk" else 4.0) * d_latent * d_in * cfg.iters
        self.training_context = self.inner.training_context if self.inner is not None else None

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "SparseCodingEncoder":
        _, options = split_inner(arg)
        return cls(arg, family_options(SparseCodingConfig(), options, build, "sparse_coding"), build)

    @property
    def W_dec(self) -> Tensor:
        return self.W

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        W, b = self.W.to(acts.device), self.b.to(acts.device)
        with torch.no_grad():
            return torch.cat([infer(acts[i:i + CHUNK], W, b, self.cfg, self.cfg.k, self.cfg.iters,
                                    step_size=self.step_size) for i in range(0, len(acts), CHUNK)])

    def decode(self, codes: Codes) -> Tensor:
        return decode_with(self.W, self.b, self.inner, codes)

    def fit(self, data: TrainingSet, progress: bool = True) -> None:
        acts = data.on_device()  # the model's device: a GPU where the run has one
        if data.codes is not None:  # known codes imply the dictionary: least squares, no alternation
            self.W, self.b = least_squares_dictionary(data.codes.to(acts.device), acts)
            self.step_size = 1.0 / lipschitz(self.W)
            self.training_flops = 2.0 * len(acts) * (self.W.shape[0] + 1) * (self.W.shape[0] + 1 + self.W.shape[1])
            return
        full = len(acts) <= self.cfg.batch_size
        W = self.W.to(acts.device).clone().requires_grad_(True)
        b = acts.mean(0).clone().requires_grad_(True)
        kept = {"codes": None}
        k = self.cfg.k

        def loss_of(batch: Tensor) -> Tensor:
            atoms = unit_rows(W)
            with torch.no_grad():
                start = kept["codes"] if full else None
                iters = self.cfg.fit_iters if full and start is not None else self.cfg.iters
                codes = infer(batch, atoms, b, self.cfg, k, iters, start=start)
                if full:
                    kept["codes"] = codes
            return ((codes @ atoms + b - batch) ** 2).mean()

        adam_steps([W, b], loss_of, acts, self.cfg.steps, self.cfg.batch_size, self.cfg.lr, self.seed, progress,
                   f"fitting {self.spec.label}")
        self.W, self.b = unit_rows(W).detach(), b.detach()
        self.step_size = 1.0 / lipschitz(self.W)
        batch = min(self.cfg.batch_size, len(acts))
        per_iter = (6.0 if self.cfg.method == "topk" else 4.0) * self.W.shape[0] * self.W.shape[1]
        inference = per_iter * (self.cfg.fit_iters if full else self.cfg.iters)
        self.training_flops = self.cfg.steps * batch * (inference + 3 * 2.0 * self.W.shape[0] * self.W.shape[1])

    def fitted_state(self) -> dict[str, Any]:
        return {"W": self.W, "b": self.b, "training_flops": self.training_flops}

    def load_fitted(self, state: dict[str, Any]) -> None:
        self.W, self.b, self.training_flops = state["W"], state["b"], state["training_flops"]
        self.step_size = 1.0 / lipschitz(self.W)
