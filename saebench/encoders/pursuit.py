"""Inference-time optimisation (ITO): greedy pursuits or gradient descent on an encoder's decoder dictionary.

``ito:<encoder spec>?method=mp|omp|gp|gradient&k=32&init=zero|encoder`` keeps the inner encoder's
decoder and replaces its encoder by an optimisation of the codes (O'Neill et al. 2024 call this
SAE + ITO):
- ``mp``, matching pursuit (Mallat & Zhang 1993): pick the atom most correlated with the residual,
  add that correlation to its code, subtract;
- ``omp``, orthogonal matching pursuit (Pati et al. 1993): pick like MP, then refit every code on the
  support by least squares;
- ``gp``, gradient pursuit (Blumensath & Davies 2008, "Gradient Pursuits"): pick like MP, then one
  exact line-search gradient step on the support's codes;
- ``gradient``: O'Neill et al.'s SAE+ITO, "gradient-based optimisation at inference time" of the
  codes, "initialised with SAE latents" (sections 3.5 and 4.2): ``iters`` steps of projected gradient
  descent on mean_dims((x - b - s W)^2) + l1 * mean_latents(s), s >= 0 (the MSE + L1 form of their
  eq. 6), the dictionary fixed, from the inner encoder's code (``init=encoder``, its default). With
  s >= 0 the L1 term is linear, so each step is a gradient step clipped at 0: ISTA (Beck & Teboulle
  2009) with step ``lr`` / L, which never raises the objective for lr <= 1. The authors' code
  (github.com/charlieoneill11/sparse-inference, experiments/known_D.py at commit 02b2109) instead runs
  Adam on exp(log s) codes started at exp(-10); saebench follows the paper's text.
Pursuits pick atoms by their largest *positive* correlation, as SAE latents are non-negative.

``k`` (atoms per token of a pursuit) defaults to the inner encoder's mean L0 on training activations,
so ITO is compared with the encoder at equal sparsity; ``gradient`` has no k (``l1`` sets its
sparsity). ``init=encoder`` starts from the inner encoder's code: a pursuit takes its k largest
latents as the support and refits their values (OMP: least squares; GP and MP: k steps restricted to
the support) instead of picking new atoms; ``gradient`` starts from the whole code.

Written here, batched on torch tensors (CPU or CUDA): scikit-learn's orthogonal_mp (the reference
the tests compare with) is numpy, one signal at a time, and picks atoms by |correlation|; no
maintained library runs these pursuits batched on torch.
"""

from dataclasses import asdict, dataclass, replace

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
from saebench.encoders.dictionary import decode_with, family_options, mean_l0, resolve_dictionary, split_inner
from saebench.encoders.sparse_coding import SparseCodingConfig, infer, lipschitz
from saebench.errors import SaebenchError

PURSUITS = ("mp", "omp", "gp")
METHODS = (*PURSUITS, "gradient")
GRADIENT_OPTIONS = ("iters", "lr", "l1")
"""Options only method=gradient reads (left out of a pursuit's spec, so its records keep their hash)."""
CHUNK = 1024
"""Tokens per pursuit chunk: bounds the (tokens, k, d_in) support tensors."""


@dataclass(frozen=True)
class ITOConfig:
    """Options of the ito encoder (``ito:sae:default?method=omp&k=32``)."""

    method: str = "omp"
    """'mp', 'omp', 'gp' (greedy pursuits) or 'gradient' (projected gradient descent on MSE + L1)."""
    k: int = 0
    """Atoms per token of a pursuit; 0: the inner encoder's mean L0 on training activations (rounded).
    Not read by 'gradient', whose sparsity is set by l1."""
    init: str = "auto"
    """'zero': from no code; 'encoder': from the inner encoder's code (a pursuit refits its k largest
    latents); 'auto': 'encoder' for gradient (O'Neill et al. section 4.2), 'zero' for pursuits."""
    iters: int = 100
    """Gradient steps per token (method=gradient; saebench's choice, as sparse_coding's iters)."""
    lr: float = 1.0
    """Step of method=gradient in units of 1/L, L the Lipschitz constant of the MSE term's gradient
    (largest eigenvalue of W W^T): in (0, 1], where every step lowers or keeps the objective."""
    l1: float = 0.01
    """Weight of mean |code| against the MSE (method=gradient), as sparse_coding's and the SAE's l1."""


class ITOEncoder(Encoder):
    """Codes optimised on the inner encoder's decoder dictionary; decodes through the inner encoder."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY})

    def __init__(self, arg: str | None, cfg: ITOConfig, build: BuildContext):
        inner_arg, _ = split_inner(arg)
        if not inner_arg:
            if build.model is not None:
                raise SaebenchError("ito needs the encoder whose dictionary it searches: e.g. ito:sae:default")
            inner_arg = "linear_sae"  # a task's own data: the SAE trained there (its dictionary, or the known one)
        cfg = _checked(cfg)
        self.inner, dictionary = resolve_dictionary(inner_arg, build, "ito")
        self.W, self.b = dictionary.W, dictionary.b
        d_latent, d_in = self.W.shape
        if cfg.method == "gradient":
            cfg = replace(cfg, k=0)
        elif cfg.k == 0:
            cfg = replace(cfg, k=max(1, round(mean_l0(self.inner, build))))
        if cfg.k > d_latent:
            raise SaebenchError(f"ito option k={cfg.k} is larger than the {d_latent} latents of {self.inner.spec.label!r}")
        if cfg.k > d_in and cfg.method == "omp":
            raise SaebenchError(f"ito option k={cfg.k} exceeds d_in={d_in}: OMP's least squares would be "
                                "underdetermined; use method=mp or gp")
        self.cfg = cfg
        self.norms = self.W.norm(dim=1).clamp_min(1e-12)
        self.atoms = self.W / self.norms[:, None]  # unit-norm atoms (d_latent, d_in)
        self.step_size = cfg.lr / lipschitz(self.W) if cfg.method == "gradient" else None
        params = asdict(cfg)
        for name in (("k",) if cfg.method == "gradient" else GRADIENT_OPTIONS):
            del params[name]
        self.spec = EncoderSpec("ito", arg, self.inner.spec.hookpoint, d_in, d_latent,
                                params | {"inner": self.inner.spec.to_dict()})
        self.encode_flops = self._flops(d_in, d_latent)
        self.training_flops = self.inner.training_flops  # ITO learns nothing; its dictionary was trained
        self.training_context = self.inner.training_context

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "ITOEncoder":
        _, options = split_inner(arg)
        return cls(arg, family_options(ITOConfig(), options, build, "ito"), build)

    @property
    def W_dec(self) -> Tensor:
        return self.W

    def _flops(self, d: int, n: int) -> float:
        """FLOPs per token of encode() as written below (a multiply-add counts 2)."""
        k, total = self.cfg.k, 0.0
        if self.cfg.method == "gradient":
            # O'Neill et al. Appendix G.4: ITO costs its per-iteration FLOPs times the iterations; here
            # s W and r W^T per step (as sparse_coding counts), after the inner encoder's code
            start = (self.inner.encode_flops or 0.0) if self.cfg.init == "encoder" else 0.0
            return start + 4.0 * n * d * self.cfg.iters
        if self.cfg.init == "encoder":
            total += (self.inner.encode_flops or 0.0) + 2 * k * d  # its code, then the residual
        for t in range(1, k + 1):
            pick = 0.0 if self.cfg.init == "encoder" else 2 * d * n  # correlations with every atom
            if self.cfg.method == "mp":
                total += pick + (2 * k if self.cfg.init == "encoder" else 0) + 2 * d
            elif self.cfg.method == "gp":
                total += pick + 2 * t * d * 2 + 4 * d
            else:  # omp: Gram of the support, right-hand side, Cholesky solve, residual
                size = k if self.cfg.init == "encoder" else t
                total += pick + 2 * size * size * d + 2 * size * d + size ** 3 / 3 + 2 * size * size + 2 * size * d
                if self.cfg.init == "encoder":
                    break  # one least-squares refit of the encoder's support
        return total

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        if self.cfg.method == "gradient":
            with torch.no_grad():
                return torch.cat([self._descend(acts[i:i + CHUNK], context, i) for i in range(0, len(acts), CHUNK)])
        with torch.no_grad():
            parts = [self._pursue(acts[i:i + CHUNK], context, i) for i in range(0, len(acts), CHUNK)]
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        # codes in the dictionary's own scale: decode(codes) = codes @ W_dec + b
        values = values / self.norms.to(values.device)[indices]
        return SparseCodes(indices, values, self.W.shape[0])  # float32, whatever the model's dtype

    def _pursue(self, x: Tensor, context: EncodeContext, start: int) -> tuple[Tensor, Tensor]:
        atoms = self.atoms.to(x.device)
        target = x.float() - self.b.to(x.device)
        k, method = self.cfg.k, self.cfg.method
        if self.cfg.init == "encoder":
            init = dense(self.inner.encode(x, context[start:start + len(x)])).float() * self.norms.to(x.device)
            support = init.topk(k, dim=1).indices
            values = init.gather(1, support)
        else:
            support = torch.empty(len(x), 0, dtype=torch.long, device=x.device)
            values = torch.empty(len(x), 0, device=x.device)
        residual = target - torch.einsum("tk,tkd->td", values, atoms[support])
        for _ in range(k):
            if self.cfg.init == "encoder":
                if method == "omp":
                    values, residual = _least_squares(atoms[support], target)
                    break
                chosen = support
            else:
                corr = residual @ atoms.T  # (tokens, d_latent)
                if method != "mp":
                    corr.scatter_(1, support, float("-inf"))  # OMP / GP: each atom once
                best = corr.argmax(1, keepdim=True)
                support = torch.cat([support, best], 1)
                values = torch.cat([values, torch.zeros_like(best, dtype=values.dtype)], 1)
                chosen = support
            if method == "mp":
                if self.cfg.init == "encoder":  # MP restricted to the support
                    corr = torch.einsum("td,tkd->tk", residual, atoms[chosen])
                    slot = corr.argmax(1, keepdim=True)
                    step = corr.gather(1, slot).clamp_min(0)
                else:
                    step = corr.gather(1, best).clamp_min(0)
                    # an atom picked before keeps one slot: add there, and leave the new slot at 0
                    matches = torch.cat([support[:, :-1] == best, torch.ones_like(best, dtype=torch.bool)], 1)
                    slot = matches.int().argmax(1, keepdim=True)  # the first slot holding it, else the new one
                values = values.scatter_add(1, slot, step)
                residual = residual - step * atoms[support.gather(1, slot)[:, 0]]
            elif method == "omp":
                values, residual = _least_squares(atoms[support], target)
            else:  # gradient pursuit: exact line search along the support's gradient
                sub_atoms = atoms[chosen]
                grad = torch.einsum("td,tkd->tk", residual, sub_atoms)
                direction = torch.einsum("tk,tkd->td", grad, sub_atoms)
                step = (grad ** 2).sum(1, keepdim=True) / (direction ** 2).sum(1, keepdim=True).clamp_min(1e-12)
                values = values + step * grad
                residual = residual - step * direction
        return support, values

    def _descend(self, x: Tensor, context: EncodeContext, start: int) -> Tensor:
        """(tokens, d_latent) codes of method=gradient: ISTA steps on the dictionary from the start code."""
        W, b = self.W.to(x.device), self.b.to(x.device)
        if self.cfg.init == "encoder":
            code = dense(self.inner.encode(x, context[start:start + len(x)])).float().clamp_min(0)
        else:
            code = torch.zeros(len(x), W.shape[0], device=x.device)
        ista = SparseCodingConfig(method="ista", l1=self.cfg.l1)
        return infer(x, W, b, ista, 0, self.cfg.iters, start=code, step_size=self.step_size)

    def decode(self, codes: Codes) -> Tensor:
        return decode_with(self.W, self.b, self.inner, codes)


def _checked(cfg: ITOConfig) -> ITOConfig:
    """`cfg` with init resolved; one clear error for an option out of range."""
    if cfg.method not in METHODS:
        raise SaebenchError(f"ito option method={cfg.method!r}: use one of {', '.join(METHODS)}")
    if cfg.init not in ("auto", "zero", "encoder"):
        raise SaebenchError(f"ito option init={cfg.init!r}: use zero, encoder or auto")
    if cfg.k < 0:
        raise SaebenchError(f"ito option k must be positive, not {cfg.k}")
    if cfg.iters < 1 or not 0 < cfg.lr <= 1 or cfg.l1 < 0:
        raise SaebenchError(f"ito options: iters must be at least 1, lr in (0, 1] (units of 1/L) and l1 "
                            f"non-negative (got iters={cfg.iters}, lr={cfg.lr}, l1={cfg.l1})")
    if cfg.init == "auto":
        cfg = replace(cfg, init="encoder" if cfg.method == "gradient" else "zero")
    return cfg


def _least_squares(sub_atoms: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Codes minimising |target - codes @ sub_atoms| per token, and the residual.

    sub_atoms: (tokens, t, d_in); target: (tokens, d_in).
    """
    gram = sub_atoms @ sub_atoms.transpose(1, 2)  # (tokens, t, t)
    gram = gram + 1e-6 * torch.eye(gram.shape[-1], device=gram.device)  # atoms picked twice stay solvable
    rhs = torch.einsum("tkd,td->tk", sub_atoms, target)
    values = torch.linalg.solve(gram, rhs)
    return values, target - torch.einsum("tk,tkd->td", values, sub_atoms)
