"""SAEs of every sae-lens kind (Standard, TopK, BatchTopK, JumpReLU, Gated, ...), through sae-lens.

Spec forms:
- ``sae:default``: saebench's embedded default SAE for the model (trained once, then cached);
  options change how it is trained, e.g. ``sae:default?context_len=1024`` (fields of
  saebench.encoders.default_sae.DefaultSAEConfig); ``@layers.5.resid_post`` places it at another hookpoint;
- ``sae:<path>``: a directory in sae-lens format (cfg.json + sae_weights.safetensors);
- ``sae:<release>/<sae_id>``: sae-lens's pretrained registry (downloads from the hub);
On a task without a model, an SAE trained on the task's own samples is ``linear_sae``
(saebench.encoders.mlp.LinearSAEEncoder), not this family.
"""

import hashlib
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from saebench.encoders.base import (
    DECODER_DICTIONARY,
    LATENTS,
    BuildContext,
    Codes,
    EncodeContext,
    Encoder,
    EncoderSpec,
    dense,
)
from saebench.encoders.specs import split_options
from saebench.errors import SaebenchError
from saebench.models import HOOKPOINT_RE

USAGE = "use sae:default, sae:<directory in sae-lens format>, or sae:<release>/<sae_id>"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_sae(arg: str, build: BuildContext) -> tuple[Any, dict[str, Any]]:
    """Load the SAE named by `arg`; returns it and the provenance that goes into its spec."""
    from sae_lens import SAE

    device = str(build.model.device) if build.model is not None else "cpu"
    arg, options = split_options(arg)
    if options and arg != "default":
        raise SaebenchError(f"options ({'&'.join(options)}) apply to sae:default only (how saebench trains it); "
                            f"sae:{arg} is loaded as it is")
    if arg == "default":
        from saebench.encoders.default_sae import default_sae_dir

        path, trained_on = default_sae_dir(build, options)
        return SAE.load_from_disk(path, device=device), {"source": "default", "path": str(path),
                                                         "weights_sha256": _file_digest(path / "sae_weights.safetensors"),
                                                         "trained_on": trained_on}
    path = Path(arg).expanduser()
    if path.is_dir():
        weights = path / "sae_weights.safetensors"
        if not (path / "cfg.json").exists() or not weights.exists():
            raise SaebenchError(f"SAE directory {arg!r} lacks cfg.json or sae_weights.safetensors "
                                "(save it with sae-lens's SAE.save_model)")
        try:
            sae = SAE.load_from_disk(path, device=device)
        except Exception as exc:
            raise SaebenchError(f"could not load the SAE in {arg!r}: {exc}") from exc
        return sae, {"source": "disk", "path": str(path.resolve()), "weights_sha256": _file_digest(weights)}
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, _, sae_id = arg.partition("/")
    if arg.startswith(("/", ".", "~")) or path.suffix:
        raise SaebenchError(f"SAE path {arg!r} does not exist; {USAGE}")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SaebenchError(f"no SAE directory at {arg!r} and {release!r} is not a sae-lens release; {USAGE}")
    if sae_id not in directory[release].saes_map:
        raise SaebenchError(f"sae-lens release {release!r} has no SAE {sae_id!r}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:
        raise SaebenchError(f"could not download SAE {arg!r} from the hub: {exc}") from exc
    return sae, {"source": "pretrained", "release": release, "sae_id": sae_id,
                 "repo_id": directory[release].repo_id}


def trained_architecture(sae: Any) -> str:
    """The architecture `sae` was trained as: sae-lens saves a BatchTopK SAE as a JumpReLU one, so the training
    settings saebench wrote into its metadata name it where they exist; else the loaded class's own."""
    trained = getattr(sae.cfg.metadata, "saebench_train_config", None) or {}
    return trained.get("architecture") or sae.cfg.architecture()


class SAELensEncoder(Encoder):
    """A sae-lens SAE: its own encode / decode, in its own dtype."""

    capabilities = frozenset({LATENTS, DECODER_DICTIONARY})

    def __init__(self, sae: Any, arg: str, hookpoint: str | None, provenance: dict[str, Any]):
        self.sae = sae.eval()
        self.sae.requires_grad_(False)
        if trained_on := provenance.pop("trained_on", None):  # what saebench trained it on, for records
            self.data_used = {"fit": trained_on}
        cfg = sae.cfg
        params = {"architecture": cfg.architecture(), "k": getattr(cfg, "k", None),
                  "normalize_activations": cfg.normalize_activations, **provenance}
        self.spec = EncoderSpec("sae", arg, hookpoint, int(cfg.d_in), int(cfg.d_sae), params,
                                display={"architecture": trained_architecture(sae)})
        self.training_context = getattr(cfg.metadata, "context_size", None)
        # W_enc x + b_enc; the activation function (ReLU, TopK, JumpReLU threshold) is not counted
        self.encode_flops = 2.0 * cfg.d_in * cfg.d_sae

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "Encoder":
        if build.model is None and (not arg or arg.startswith("?")):
            raise SaebenchError("'sae' loads or trains sae-lens SAEs on a language model's activations, and this "
                                "task has no model; an SAE trained on the task's own samples is 'linear_sae'")
        if not arg or arg.startswith("?"):
            raise SaebenchError(f"encoder 'sae' needs an argument: {USAGE}")
        if build.model is None and arg.split("?")[0] == "default":
            raise SaebenchError("sae:default is trained on a language model's activations; this task has none "
                                "(on synthetic data, plain 'sae' trains an SAE on the task's samples)")
        sae, provenance = _load_sae(arg, build)
        hook_name = sae.cfg.metadata.hook_name
        match = HOOKPOINT_RE.match(hook_name or "")
        hookpoint = f"layers.{match.group(1)}.{match.group(2)}" if match else None
        if hookpoint is None and hook_name:
            # never splice an SAE somewhere else than where it was trained: an MLP-input or
            # attention-z SAE may have the residual stream's width, so a width check could not catch it
            raise SaebenchError(f"SAE {arg!r} was trained at {hook_name!r}, which saebench cannot splice (it "
                                "splices blocks.{i}.hook_resid_pre, hook_resid_post, hook_attn_out and hook_mlp_out)")
        if build.model is None:  # no model to place it in (a benchmark of encoders alone)
            return cls(sae, arg, hookpoint, provenance)
        if hookpoint:
            hookpoint = build.model.hookpoint(hookpoint).name  # the model must have it (layer, known modules)
        if hookpoint and build.hookpoint:
            asked = build.model.hookpoint(build.hookpoint)
            trained_kind = hookpoint.rsplit(".", 1)[1]
            if asked.kind != trained_kind:
                raise SaebenchError(f"SAE {arg!r} was trained at {hook_name} ({trained_kind}) but --hookpoint is "
                                    f"{build.hookpoint} ({asked.kind}); --hookpoint may move an SAE to another layer "
                                    "only at the same kind of hookpoint")
            if asked.name != hookpoint:
                print(f"saebench: SAE {arg!r} was trained at {hookpoint}; splicing it at {asked.name} as "
                      "--hookpoint asks", file=sys.stderr)
                provenance = provenance | {"trained_at": hookpoint}
            hookpoint = asked.name
        return cls(sae, arg, hookpoint or build.hookpoint, provenance)

    @property
    def W_dec(self) -> Tensor:
        """(d_latent, d_in) decoder dictionary."""
        return self.sae.W_dec

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return self.sae.encode(acts.to(self.sae.dtype))

    def decode(self, codes: Codes) -> Tensor:
        return self.sae.decode(dense(codes))
