"""Encoders: anything with encode(acts, context) -> codes and decode(codes) -> reconstruction.

One module per family. Each registers a class through the ``saebench.encoders`` entry-point
group; the class builds itself with ``from_arg(arg, build)`` where ``arg`` is what follows the
colon in ``--encoder name:arg``.
"""

from saebench.encoders.base import (
    BuildContext,
    EncodeContext,
    Encoder,
    EncoderSpec,
    EvalData,
    SparseCodes,
    parse_encoder_arg,
)

__all__ = ["BuildContext", "EncodeContext", "Encoder", "EncoderSpec", "EvalData", "SparseCodes", "parse_encoder_arg"]
