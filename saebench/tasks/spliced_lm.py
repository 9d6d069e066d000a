"""lm-eval's HFLM with an encoder's reconstruction spliced in at a hookpoint, for a model and encoder saebench
has already built: what the lm-eval tasks run (lambada, cbt, lm_eval:<task>). lm-eval's own CLI reaches the
same class through `saebench.lm_eval_model`, which builds the model and encoder from `--model_args`."""

from typing import Any, Protocol

import torch
from lm_eval.models.huggingface import HFLM
from torch import Tensor

from saebench.encoders.base import Codes, Encoder
from saebench.errors import SaebenchError
from saebench.models import LoadedModel
from saebench.splice import Splice, SpliceConfig, sink_mask


class BatchObserver(Protocol):
    """What a saebench task watches in each forward pass lm-eval makes."""

    def start(self, token_ids: Tensor) -> None:
        """Called with the (batch, seq) input ids before the forward pass."""

    def on_chunk(self, acts: Tensor, codes: Codes, recon: Tensor, rows: Tensor) -> None:
        """The splice's chunk callback (codes of the spliced positions)."""

    def finish(self, token_ids: Tensor, logits: Tensor) -> None:
        """Called with the (batch, seq, vocab) logits after the forward pass."""

    def tokenized(self, requests: list[tuple[tuple[str, str], list[int], list[int]]]) -> None:
        """Called with lm-eval's tokenised loglikelihood requests ((context, continuation), ids, ids), in order."""


class SplicedLM(HFLM):
    """HFLM whose forward passes splice decode(encode(x)) in at a hookpoint.

    `encoder` None is the clean model, identical to lm-eval's `hf` model. lm-eval right-pads its
    loglikelihood batches, so the splice sees real tokens at their real positions; attention sinks
    (position 0, BOS) pass through unspliced unless splice_bos.
    """

    def __init__(self, loaded: LoadedModel, encoder: Encoder | None = None, hookpoint: str | None = None,
                 splice_bos: bool = False, batch_size: int | str = 1, **kwargs: Any):
        """
        Args:
            loaded: the subject model.
            encoder: a built encoder, or None for the clean model.
            hookpoint: e.g. 'layers.15.resid_post'; default: the encoder's own, else the model preset's.
            splice_bos: also splice attention-sink positions.
        """
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, **kwargs)
        self.loaded = loaded
        self.splice_config = SpliceConfig(str(splice_bos).lower() == "true")
        self.encoder: Encoder | None = encoder
        name = (encoder.spec.hookpoint if encoder is not None else None) or hookpoint or loaded.default_hookpoint
        if name is None and encoder is not None:
            raise SaebenchError("no hookpoint: pass hookpoint=layers.<i>.resid_post in model_args")
        self.hookpoint = loaded.hookpoint(name) if name else None
        self.observer: BatchObserver | None = None
        self._encoded: list | None = None

    def encoded_requests(self, requests) -> list[tuple[tuple[str, str], list[int], list[int]]]:
        """lm-eval's own tokenisation of loglikelihood requests, ((context, continuation), ids, ids)
        in order, without running the model: lm-eval's `loglikelihood` encodes them as usual and
        the call stops where the forward passes would begin."""
        self._encoded = []
        try:
            self.loglikelihood(requests, disable_tqdm=True)
            return self._encoded
        finally:
            self._encoded = None

    def keep_mask(self, token_ids: Tensor) -> Tensor:
        """(batch, seq) positions passed through unspliced."""
        if self.splice_config.splice_bos:
            return torch.zeros_like(token_ids, dtype=torch.bool)
        return sink_mask(token_ids, self.loaded.bos_id)

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        obs = self.observer
        if obs is not None:
            obs.start(inps)
        if self.encoder is None:
            logits = super()._model_call(inps, attn_mask, labels)
        else:
            splice = Splice(self.hookpoint, self.encoder, self.splice_config,
                            obs.on_chunk if obs is not None else None)
            splice.set_batch(inps, self.keep_mask(inps))
            with splice.installed():
                logits = super()._model_call(inps, attn_mask, labels)
        if obs is not None:
            obs.finish(inps, logits)
        return logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self._encoded is not None:
            self._encoded.extend(requests)
            return [(0.0, False)] * len(requests)
        if self.observer is not None:
            self.observer.tokenized(requests)
        return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

    def _model_generate(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.encoder is None:
            return super()._model_generate(*args, **kwargs)
        raise SaebenchError("the saebench lm-eval model splices loglikelihood requests only; "
                            "generate_until tasks are not supported with an encoder")

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        return info | {"saebench_model": self.loaded.model_id,
                       "saebench_encoder": None if self.encoder is None else self.encoder.spec.label,
                       "saebench_hookpoint": None if self.hookpoint is None else self.hookpoint.name}
