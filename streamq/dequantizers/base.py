"""The interface every quantized SOURCE format implements, and the registry that picks one from config.json.

A quantized checkpoint stores one logical weight as several physical tensors (an FP8 weight plus its
scales, MXFP4 blocks plus scales). A `Dequantizer` says which physical keys form which logical tensor,
what that tensor's name, dtype and shape are once dequantized, and computes it exactly as the reference
does. Everything downstream (planning on the meta model, the output converters) then sees a plain
full-precision checkpoint, and each shard is dequantized one logical tensor at a time as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import AlreadyQuantizedError, StreamqError, UnsupportedDtypeError
from ..targets import FLOAT_CODES, TensorInfo

if TYPE_CHECKING:
    import torch

DTYPE_CODES = {name: code for code, name in FLOAT_CODES.items()}  # "bfloat16" -> "BF16"


@dataclass(frozen=True)
class LogicalTensor:
    """One dequantized tensor: its name, the physical keys it is made from, and what it will be."""

    key: str
    parts: tuple[str, ...]  # physical checkpoint keys, all consumed; parts[0] holds the quantized values
    info: TensorInfo  # dtype (safetensors code) and shape after dequantization


class Dequantizer(Protocol):
    """One quantized source format. `method` is config.json's quantization_config.quant_method."""

    method: str
    scale_suffixes: tuple[str, ...]  # physical keys ending so belong to some weight: one left unpaired is an error

    def logical_tensors(self, physical: dict[str, TensorInfo], dtype: str) -> dict[str, LogicalTensor]:
        """The quantized weights among `physical` (one shard's or the whole checkpoint's header), keyed by
        logical name; `dtype` is the model dtype they dequantize to. Raises for companions of an unexpected
        dtype or shape; a quantized tensor without its companions is left out (`logical_checkpoint` names it)."""
        ...

    def dequantize(self, tensor: LogicalTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The full-precision tensor, from its physical parts (keyed by physical key), in `dtype`."""
        ...


class NotDequantizable(Exception):
    """Raised by a dequantizer's `from_config` for a variant of its method it cannot dequantize exactly;
    the message says which and is appended to the refusal."""


def dequantizer_for(name: str, config: dict[str, Any]) -> Dequantizer | None:
    """The dequantizer for config.json's quantization block; None for an unquantized model.

    A method (or variant) streamq cannot dequantize exactly is refused, naming it and what to do instead."""
    quant, field_name = None, None
    for field_name in ("quantization_config", "compression_config"):  # older compressed-tensors use the second
        quant = config.get(field_name)
        if quant:
            break
    if not quant:
        return None
    method = str(quant["quant_method"]) if isinstance(quant, dict) and quant.get("quant_method") else None
    detail = ("streamq dequantizes block FP8 (quant_method fp8), compressed-tensors FP8 (float-quantized) and "
              "MXFP4 sources, not this one")
    try:
        if method == "fp8":
            from .fp8_block import BlockFP8Dequantizer

            return BlockFP8Dequantizer.from_config(quant)
        if method == "mxfp4":
            from .mxfp4 import MXFP4Dequantizer

            return MXFP4Dequantizer()
        if method == "compressed-tensors":
            from .compressed_fp8 import CompressedFP8Dequantizer

            return CompressedFP8Dequantizer.from_config(quant)
    except NotDequantizable as exc:
        detail = str(exc)
    if method is None:
        keys = ", ".join(sorted(quant)[:6]) if isinstance(quant, dict) else "not a mapping"
        method = f"unknown method; its keys: {keys}"
    raise AlreadyQuantizedError(
        f"{name} is already quantized ({method}) according to {field_name} in config.json; {detail}. "
        "Start from the full-precision model instead"
    )


def serialized_names(quantizer_cls: type, method: str) -> dict[str, list[str]]:
    """transformers' table of the checkpoint names one parameter is stored under for `method`
    (`HfQuantizer.serialized_names`, transformers 5.25 and later)."""
    names = getattr(quantizer_cls, "serialized_names", None)
    if not names:
        import transformers

        raise StreamqError(
            f"dequantizing a {method} source needs transformers >= 5.25 (this is {transformers.__version__}): "
            "pip install -U 'transformers>=5.25,<6'"
        )
    return {param: list(stored) for param, stored in names.items()}


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers' dequantized `save_pretrained` leaves it: no quantization block."""
    return {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}


def logical_checkpoint(
    dequantizer: Dequantizer, headers: dict[str, dict[str, TensorInfo]], dtype: str
) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, LogicalTensor]]:
    """Each shard's header as the dequantized checkpoint would have it, and the logical tensors.

    A logical tensor is made from parts of one file only."""
    logical_headers: dict[str, dict[str, TensorInfo]] = {}
    logical: dict[str, LogicalTensor] = {}
    for name, header in headers.items():
        found = dequantizer.logical_tensors(header, dtype)
        consumed = {part for tensor in found.values() for part in tensor.parts}
        orphans = [key for key in header if key.endswith(dequantizer.scale_suffixes) and key not in consumed]
        if orphans:
            raise UnsupportedDtypeError(
                f"{name}: {orphans[0]} has no quantized weight beside it in this file; streamq dequantizes "
                "each weight with its scales from one file"
            )
        shard = {key: info for key, info in header.items() if key not in consumed}
        shard.update({key: tensor.info for key, tensor in found.items()})
        leftover = [key for key, info in shard.items() if info.dtype not in FLOAT_CODES and info.dtype.startswith("F")]
        if leftover:
            raise UnsupportedDtypeError(
                f"{name}: tensor {leftover[0]} is {shard[leftover[0]].dtype} but is not part of a {dequantizer.method} "
                "weight streamq knows how to dequantize (its scales are missing from this shard, or named otherwise); streamq "
                "needs each weight with its scales in one file"
            )
        logical_headers[name] = shard
        logical.update(found)
    return logical_headers, logical


def model_dtype_code(dtype: str) -> str:
    """The safetensors code of a dequantized tensor in the model dtype."""
    if dtype not in DTYPE_CODES:
        raise UnsupportedDtypeError(f"streamq dequantizes to float16, bfloat16 or float32, not {dtype}")
    return DTYPE_CODES[dtype]
