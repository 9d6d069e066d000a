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

Data-parallel: `torchrun --nproc-per-node N -m lm_eval --model saebench ...` (or, on GPUs, `accelerate
launch --multi_gpu -m lm_eval ...`) splits lm-eval's requests over the N ranks, with the numbers of one process (see
`SaebenchLM._split_requests_over_ranks`).
"""

import sys
from typing import Any

from accelerate import Accelerator
from lm_eval.api.registry import register_model
from torch import Tensor

from saebench import distributed
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
        distributed.init_from_env(device)  # before loading, so that a launched rank's model goes to its own GPU
        # each rank runs on GPU LOCAL_RANK whatever --device says, as lm-eval's `hf` model does under accelerate
        # ("device ... will be overridden when placing model")
        device = distributed.rank_device(None if device is None else str(device))
        loaded = pretrained if isinstance(pretrained, LoadedModel) else load_model(
            pretrained, None if dtype in (None, "auto") else str(dtype), device)
        if isinstance(encoder, str):
            if encoder.lower() == "none":
                encoder = None
            else:
                # a fit (sae:default, mlp, ...) runs on rank 0 alone; the other ranks load what it cached
                with distributed.main_first(f"building the encoder {encoder!r}"):
                    encoder, hookpoint = build_encoder(encoder, loaded,
                                                       RunConfig(hookpoint=hookpoint, progress=False))
                encoder.prepare(_NoEvalData(encoder.spec.label))
        super().__init__(loaded, encoder, hookpoint, splice_bos, batch_size, **kwargs)
        if distributed.active():
            self._split_requests_over_ranks()

    def _split_requests_over_ranks(self) -> None:
        """Make lm-eval's evaluator give each rank of a torchrun / accelerate launch its share of the requests.

        HFLM sets up data parallelism only when it loads a model by name onto several GPUs; handed a built
        model, as here, it says rank 0 of 1, and every rank would score every request. lm-eval 0.4.12 and
        0.4.13 read `rank` and `world_size` to split the documents (`build_all_requests`, every
        world_size-th document from the rank's), pad the ranks to equal request counts with `all_gather`,
        wait with `barrier` and collect per-sample metrics on rank 0 with torch.distributed's
        `gather_object`; HFLM's `all_gather` and `barrier` call `self.accelerator.gather` and
        `.wait_for_everyone()`. accelerate's own Accelerator serves them over the process group
        `init_from_env` joined (it joins none while one exists). On the CPU it needs cpu=True: without it,
        it finds no accelerator device and reports a single process.
        """
        self._rank, self._world_size = distributed.rank(), distributed.world_size()
        self.accelerator = Accelerator(cpu=self.device.type == "cpu")
        if self.accelerator.num_processes != self._world_size:
            raise SaebenchError(f"accelerate sees {self.accelerator.num_processes} processes but torch.distributed "
                                f"{self._world_size}; start lm_eval with torchrun or accelerate launch")
        if distributed.is_main():
            print(f"saebench: lm-eval's requests are split over {self._world_size} ranks", file=sys.stderr,
                  flush=True)
