"""Building an encoder from its spec string: the one way the runner, tasks and encoders built from
encoders (``ito:sae:default``) all use.

An encoder with the FITS capability is fitted right after it is built, on the build context's
training set; what it learned is cached under ``<cache>/fitted/`` by a hash of its spec and of the
training data, so the next run loads it instead of training again.
"""

import sys
from pathlib import Path

import torch

from saebench.encoders.base import FITS, BuildContext, Encoder, parse_encoder_arg
from saebench.encoders.specs import split_hookpoint
from saebench.errors import SaebenchError, did_you_mean
from saebench.records import config_hash, save_atomic
from saebench.registry import ENCODER_GROUP, available, load_plugin


def encoder_class(spec: str) -> type[Encoder]:
    """The registered class of `spec`'s family; an unknown name gets a 'did you mean'."""
    name, _ = parse_encoder_arg(split_hookpoint(spec)[0])
    if name not in available(ENCODER_GROUP):
        raise SaebenchError(f"unknown encoder {name!r}{did_you_mean(name, available(ENCODER_GROUP))}; "
                            "`saebench list encoders` shows them all")
    return load_plugin(ENCODER_GROUP, name)


def build_from_spec(spec: str, build: BuildContext) -> Encoder:
    """Build the encoder `spec` ('name[:arg][?options]', no '@hookpoint') and fit it if it learns."""
    name, arg = parse_encoder_arg(spec)
    enc = encoder_class(spec).from_arg(arg, build)
    if FITS in enc.capabilities:
        fit_cached(enc, build)
    return enc


def fit_cached(enc: Encoder, build: BuildContext) -> None:
    """Fit `enc` on the build's training set, or load what an earlier run with the same spec and data learned."""
    data = build.training_set(enc.spec.hookpoint, enc.train_tokens)
    path = None
    if build.cache_dir is not None:
        key = config_hash({"encoder": enc.spec.to_dict(), "data": data.key, "fit_version": enc.fit_version})
        path = Path(build.cache_dir) / "fitted" / f"{enc.spec.name}-{key}.pt"
        if path.exists():
            try:
                enc.load_fitted(torch.load(path, weights_only=False))
                return
            except Exception as exc:  # a corrupt cache entry costs a refit, nothing more
                print(f"saebench: cached fit {path} is unreadable ({exc}); fitting again", file=sys.stderr)
    if build.progress and path is not None:
        print(f"saebench: fitting {enc.spec.label} (once; cached in {path})", file=sys.stderr, flush=True)
    enc.fit(data, build.progress)
    if path is not None:
        save_atomic(path, enc.fitted_state())
