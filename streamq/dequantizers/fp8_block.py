"""DeepSeek-V3/R1-style block FP8 sources (`quant_method: "fp8"`): e4m3 weights with float32
`weight_scale_inv` per block of `weight_block_size` (usually 128x128).

Which tensors belong together is transformers' own rule (`FineGrainedFP8HfQuantizer.serialized_names`:
a weight, its `weight_scale_inv`, and an `activation_scale` that dequantizing drops). The arithmetic is
compressed-tensors' `FP8BlockDequantizer` (the FP8 weight and its block scale multiplied in float32,
then cast), which is bit-identical to transformers' `Fp8Dequantize` wherever the weight's dimensions
are multiples of the block. Where they are not (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows in 5 blocks
of 128), transformers 5.25 derives the block from the scale grid instead: it refuses to load 576 rows
and mis-scales 144 rows as two blocks of 72. compressed-tensors pads to whole blocks, as DeepSeek's
own dequantization does; streamq follows it there.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from ..errors import StreamqError, UnsupportedDtypeError
from ..targets import TensorInfo
from .base import LogicalTensor, NotDequantizable, model_dtype_code, serialized_names

if TYPE_CHECKING:
    import torch

_SCALE_DTYPES = ("F32", "BF16", "F16")


def _serialized_names() -> list[str]:
    """["weight", "weight_scale_inv", "activation_scale"]: the names transformers loads for one FP8 weight."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    return serialized_names(FineGrainedFP8HfQuantizer, "fp8")["weight"]


class BlockFP8Dequantizer:
    method = "fp8"
    scale_suffixes = (".weight_scale_inv", ".activation_scale")

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block
        self.names = _serialized_names()

    @classmethod
    def from_config(cls, quant: dict[str, Any]) -> BlockFP8Dequantizer:
        block = quant.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise NotDequantizable(f"its weight_block_size is {block!r}, and streamq dequantizes block-scaled FP8 (e.g. [128, 128]) only")
        if quant.get("fmt", "e4m3") != "e4m3":
            raise NotDequantizable(f"its FP8 format is {quant.get('fmt')!r}, and streamq dequantizes e4m3 weights only")
        return cls((block[0], block[1]))

    def logical_tensors(self, physical: dict[str, TensorInfo], dtype: str) -> dict[str, LogicalTensor]:
        weight, scale, activation = self.names
        found = {}
        for key, info in physical.items():
            module, _, param = key.rpartition(".")
            scale_key = f"{module}.{scale}"
            if param != weight or info.dtype != "F8_E4M3" or scale_key not in physical:
                continue
            scale_info = physical[scale_key]
            grid = tuple(math.ceil(d / b) for d, b in zip(info.shape, self.block))
            if len(info.shape) != 2 or scale_info.dtype not in _SCALE_DTYPES or tuple(scale_info.shape) != grid:
                raise UnsupportedDtypeError(
                    f"{key} is FP8 {list(info.shape)} with {scale} {scale_info.dtype} {list(scale_info.shape)}; streamq "
                    f"expects a 2-D weight and one float scale per {self.block[0]}x{self.block[1]} block"
                )
            parts = (key, scale_key) + ((f"{module}.{activation}",) if f"{module}.{activation}" in physical else ())
            found[key] = LogicalTensor(key, parts, TensorInfo(model_dtype_code(dtype), tuple(info.shape)))
        return found

    def dequantize(self, tensor: LogicalTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        dequantizer = _ct_block_dequantizer(self.block, dtype)
        key, scale_key = tensor.parts[:2]
        return dequantizer.process({key: parts[key], scale_key: parts[scale_key]})[key]


@functools.cache
def _ct_block_dequantizer(block: tuple[int, int], dtype: torch.dtype) -> Any:
    try:
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    except ImportError as exc:
        raise StreamqError(
            "dequantizing an FP8 source needs the compressed-tensors package: pip install 'compressed-tensors>=0.20'"
        ) from exc
    return FP8BlockDequantizer(weight_block_size=block, dtype=dtype)
