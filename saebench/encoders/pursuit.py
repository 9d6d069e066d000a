"""Inference-time optimisation (ITO): greedy pursuits on an encoder's decoder dictionary.

``ito:<encoder spec>?method=mp|omp|gp&k=32&init=zero|encoder`` keeps the inner encoder's decoder
and replaces its encoder by a pursuit (O'Neill et al. 2024 call this SAE + ITO):
- ``mp``, matching pursuit (Mallat & Zhang 1993): pick the atom most correlated with the residual,
  add that correlation to its code, subtract;
- ``omp``, orthogonal matching pursuit (Pati et al. 1993): pick like MP, then refit every code on the
  support by least squares;
- ``gp``, gradient pursuit (Blumensath & Davies 2008, "Gradient Pursuits"): pick like MP, then one
  exact line-search gradient step on the support's codes.
Atoms are picked by their largest *positive* correlation, as SAE latents are non-negative.

``k`` (atoms per token) defaults to the inner encoder's mean L0 on training activations, so ITO is
compared with the encoder at equal sparsity. ``init=encoder`` starts from the inner encoder's code:
its k largest latents are the support, and the method refits their values (OMP: least squares;
GP and MP: k steps restricted to the support) instead of picking new atoms.

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
from saebench.errors import SaebenchError

METHODS = ("mp", "omp", "gp")
CHUNK = 1024
"""Tokens per pursuit chunk: bounds the (tokens, k, d_in) support tensors."""


@dataclass(frozen=True)
class ITOConfig:
    """Options of the ito encoder (``ito:sae:default?method=omp&k=32``)."""

    method: str = "omp"
    """'mp', 'omp' or 'gp'."""
    k: int = 0
    """Atoms per token; 0: the inner encoder's mean L0 on training activations (rounded)."""
    init: str = "zero"
    """'zero': pick k atoms greedily; 'encoder': refit the inner encoder's own k largest latents."""


class ITOEncoder(Encoder):
    """A pursuit on the inner encoder's decoder dictionary; decodes through the inner encoder."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY})

    def __init__(self, arg: str | None, cfg: ITOConfig, build: BuildContext):
        inner_arg, _ = split_inner(arg)
        if not inner_arg:
            if build.model is not None:
                raise SaebenchError("ito needs the encoder whose dictionary it searches: e.g. ito:sae:default")
            inner_arg = "linear_sae"  # a task's own data: the SAE trained there (its dictionary, or the known one)
        if cfg.method not in METHODS:
            raise SaebenchError(f"ito option method={cfg.method!r}: use one of {', '.join(METHODS)}")
        if cfg.init not in ("zero", "encoder"):
            raise SaebenchError(f"ito option init={cfg.init!r}: use zero or encoder")
        self.inner, dictionary = resolve_dictionary(inner_arg, build, "ito")
        self.W, self.b = dictionary.W, dictionary.b
        d_latent, d_in = self.W.shape
        if cfg.k < 0:
            raise SaebenchError(f"ito option k must be positive, not {cfg.k}")
        if cfg.k == 0:
            l0 = mean_l0(self.inner, build)
            cfg = replace(cfg, k=max(1, round(l0)))
        if cfg.k > d_latent:
            raise SaebenchError(f"ito option k={cfg.k} is larger than the {d_latent} latents of {self.inner.spec.label!r}")
        if cfg.k > d_in and cfg.method == "omp":
            raise SaebenchError(f"ito option k={cfg.k} exceeds d_in={d_in}: OMP's least squares would be "
                                "underdetermined; use method=mp or gp")
        self.cfg = cfg
        self.norms = self.W.norm(dim=1).clamp_min(1e-12)
        self.atoms = self.W / self.norms[:, None]  # unit-norm atoms (d_latent, d_in)
        self.spec = EncoderSpec("ito", arg, self.inner.spec.hookpoint, d_in, d_latent,
                                asdict(cfg) | {"inner": self.inner.spec.to_dict()})
        self.encode_flops = self._flops(d_in, d_latent)
        self.training_flops = self.inner.training_flops  # a pursuit learns nothing; its dictionary was trained
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

    def decode(self, codes: Codes) -> Tensor:
        return decode_with(self.W, self.b, self.inner, codes)


def _least_squares(sub_atoms: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Codes minimising |target - codes @ sub_atoms| per token, and the residual.

    sub_atoms: (tokens, t, d_in); target: (tokens, d_in).
    """
    gram = sub_atoms @ sub_atoms.transpose(1, 2)  # (tokens, t, t)
    gram = gram + 1e-6 * torch.eye(gram.shape[-1], device=gram.device)  # atoms picked twice stay solvable
    rhs = torch.einsum("tkd,td->tk", sub_atoms, target)
    values = torch.linalg.solve(gram, rhs)
    return values, target - torch.einsum("tk,tkd->td", values, sub_atoms)
