"""Reference encoders with known answers: identity (loses nothing), zero and mean ablation."""

from torch import Tensor

from saebench.encoders.base import BuildContext, Codes, EncodeContext, Encoder, EncoderSpec, EvalData
from saebench.errors import SaebenchError


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise SaebenchError(f"encoder {name!r} takes no argument (got {name}:{arg})")


class IdentityEncoder(Encoder):
    """decode(encode(x)) = x exactly: CE loss recovered 1, KL 0."""

    def __init__(self, d_in: int, hookpoint: str | None = None):
        self.spec = EncoderSpec("identity", None, hookpoint, d_in, None)

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "IdentityEncoder":
        _no_arg("identity", arg)
        return cls(build.model.d_model, build.hookpoint)

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts

    def decode(self, codes: Codes) -> Tensor:
        return codes


class ZeroEncoder(Encoder):
    """Zero ablation: the reconstruction is all zeros (CE loss recovered 0 by definition)."""

    def __init__(self, d_in: int, hookpoint: str | None = None):
        self.spec = EncoderSpec("zero", None, hookpoint, d_in, None)

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "ZeroEncoder":
        _no_arg("zero", arg)
        return cls(build.model.d_model, build.hookpoint)

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts.new_zeros(acts.shape[0], 0)

    def decode(self, codes: Codes) -> Tensor:
        return codes.new_zeros(codes.shape[0], self.spec.d_in)


class MeanEncoder(Encoder):
    """Mean ablation: every activation becomes the mean activation over the evaluation tokens."""

    def __init__(self, d_in: int, hookpoint: str | None = None):
        self.spec = EncoderSpec("mean", None, hookpoint, d_in, None)
        self.mean: Tensor | None = None

    @classmethod
    def from_arg(cls, arg: str | None, build: BuildContext) -> "MeanEncoder":
        _no_arg("mean", arg)
        return cls(build.model.d_model, build.hookpoint)

    def prepare(self, data: EvalData) -> None:
        self.mean = data.activation_mean()

    def encode(self, acts: Tensor, context: EncodeContext) -> Codes:
        return acts.new_zeros(acts.shape[0], 0)

    def decode(self, codes: Codes) -> Tensor:
        if self.mean is None:
            raise RuntimeError("MeanEncoder.prepare() was not called")
        return self.mean.to(codes.device, codes.dtype).expand(codes.shape[0], -1)
