"""Reference encoders with known answers: identity (loses nothing), zero and mean ablation."""

from typing import ClassVar

from torch import Tensor

from saebench.encoders.base import BuildContext, Codes, EncodeContext, Encoder, EncoderSpec, EvalData
from saebench.errors import SaebenchError


class _Baseline(Encoder):
    """An encoder without arguments or latents, at the run's hookpoint."""

    key: ClassVar[str]
    encode_flops = 0.0  # no arithmetic per token

    def __init__(self, d_in: int, hookpoint: str | None = None):
        self.spec = EncoderSpec(self.key, None, hookpoint, d_in, None)

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "_Baseline":
        if arg is not None:
            raise SaebenchError(f"encoder {cls.key!r} takes no argument (got {cls.key}:{arg})")
        return cls(build.d_in, build.hookpoint)


class IdentityEncoder(_Baseline):
    """decode(encode(x)) = x exactly: CE loss recovered 1, KL 0."""

    key = "identity"

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts

    def decode(self, codes: Codes) -> Tensor:
        return codes


class ZeroEncoder(_Baseline):
    """Zero ablation: the reconstruction is all zeros (CE loss recovered 0 by definition)."""

    key = "zero"

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts.new_zeros(acts.shape[0], 0)

    def decode(self, codes: Codes) -> Tensor:
        return codes.new_zeros(codes.shape[0], self.spec.d_in)


class MeanEncoder(_Baseline):
    """Mean ablation: every activation becomes the mean activation over the evaluation tokens."""

    key = "mean"
    mean: Tensor | None = None

    def prepare(self, data: EvalData) -> None:
        self.mean = data.activation_mean()

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts.new_zeros(acts.shape[0], 0)

    def decode(self, codes: Codes) -> Tensor:
        if self.mean is None:
            raise RuntimeError("MeanEncoder.prepare() was not called")
        return self.mean.to(codes.device, codes.dtype).expand(codes.shape[0], -1)
