"""lm-eval model `saebench`: lm-eval's HFLM with an encoder's reconstruction spliced in.

    lm_eval --model saebench --model_args pretrained=smollm2-135m,encoder=sae:default,hookpoint=layers.15.resid_post ...

lm-eval 0.4.13 finds models only in its own registry (`lm_eval.models.MODEL_MAPPING` plus
`@register_model` on classes that have been imported); it reads no entry-point group. So the
saebench wheel installs `saebench_lm_eval.pth`, which runs `saebench.lm_eval_plugin.install()`
at interpreter start-up: it registers the *name* 'saebench' -> 'saebench.lm_eval_model:SaebenchLM'
as a lazy placeholder the moment lm-eval's model registry is first imported, and nothing else
(no torch, no lm-eval import until lm-eval itself asks). Python users can equally import this
module, whose `@register_model` does the same.

This module sits beside the runner: it builds the model and encoder from lm-eval's string
`--model_args` the way `saebench run` does; the splicing itself is saebench.tasks.spliced_lm's.
"""

from typing import Any

from lm_eval.api.registry import register_model
from torch import Tensor

from saebench.encoders.base import Encoder
from saebench.errors import SaebenchError
from saebench.models import LoadedModel, load_model
from saebench.runner import RunConfig, build_encoder
from saebench.tasks.spliced_lm import SplicedLM


class _NoEvalData:
    """Stand-in for evaluation data when lm-eval, not a saebench task, drives the model."""

    def __init__(self, label: str):
        self.label = label

    def activation_mean(self) -> Tensor:
        raise SaebenchError(f"encoder {self.label!r} needs saebench's evaluation data (mean activation); "
                            "run it through `saebench run`, not lm-eval's CLI")


@register_model("saebench")
class SaebenchLM(SplicedLM):
    """The spliced HFLM, built from lm-eval's `--model_args` strings.

    `encoder` None (or `encoder=none`) is the clean model, identical to lm-eval's `hf` model.
    """

    def __init__(self, pretrained: str | LoadedModel, encoder: str | Encoder | None = None,
                 hookpoint: str | None = None, splice_bos: bool = False, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = 1, **kwargs: Any):
        """
        Args:
            pretrained: saebench model preset, HF hub id or local path, or a LoadedModel.
            encoder: encoder spec string ('sae:default', 'identity', ...) or a built Encoder.
            hookpoint: e.g. 'layers.15.resid_post'; default: the encoder's own, else the model preset's.
            splice_bos: also splice attention-sink positions.
            dtype, device: passed to saebench's model loader ('auto' means saebench's auto rule).
        """
        loaded = pretrained if isinstance(pretrained, LoadedModel) else load_model(
            pretrained, None if dtype in (None, "auto") else str(dtype), device)
        if isinstance(encoder, str):
            if encoder.lower() == "none":
                encoder = None
            else:
                encoder, hookpoint = build_encoder(encoder, loaded, RunConfig(hookpoint=hookpoint, progress=False))
                encoder.prepare(_NoEvalData(encoder.spec.label))
        super().__init__(loaded, encoder, hookpoint, splice_bos, batch_size, **kwargs)
