"""streamq: re-quantize a Hugging Face model repo tensor by tensor, resumably: bitsandbytes NF4/FP4,
compressed-tensors int4, or the dequantized bf16 checkpoint of an FP8/MXFP4 source."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AccessDeniedError,
    AlreadyQuantizedError,
    ConcurrentRunError,
    CorruptShardError,
    InsufficientDiskError,
    ManifestMismatchError,
    NoSafetensorsError,
    OutputNotWritableError,
    SourceNotFoundError,
    StreamqError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)
from .pipeline import RequantizeResult, ShardRecord, iter_requantize, plan_requantize, stream_requantize  # noqa: E402
from .verify import VerifyReport, read_status, verify_output  # noqa: E402

__all__ = [
    "AccessDeniedError",
    "AlreadyQuantizedError",
    "ConcurrentRunError",
    "CorruptShardError",
    "InsufficientDiskError",
    "ManifestMismatchError",
    "NoSafetensorsError",
    "OutputNotWritableError",
    "RequantizeResult",
    "ShardRecord",
    "VerifyReport",
    "SourceNotFoundError",
    "StreamqError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
    "__version__",
    "iter_requantize",
    "plan_requantize",
    "read_status",
    "verify_output",
    "stream_requantize",
]
