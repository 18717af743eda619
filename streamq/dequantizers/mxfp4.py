"""gpt-oss MXFP4 sources (`quant_method: "mxfp4"`): MoE expert weights stored as `<param>_blocks`
(two e2m1 values per byte, 32 per block) and `<param>_scales` (one e8m0 exponent per block).

Which parameters are stored so, and under which names, is transformers' own table
(`Mxfp4HfQuantizer.serialized_names`); the values are transformers' own `convert_moe_packed_tensors`,
the function its `Mxfp4Dequantize` load op calls, so the bytes are the ones
`Mxfp4Config(dequantize=True)` loads. The result is transposed: blocks [E, out, G, 16] give [E, in, out].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedDtypeError
from ..targets import TensorInfo
from .base import LogicalTensor, model_dtype_code, serialized_names

if TYPE_CHECKING:
    import torch


class MXFP4Dequantizer:
    method = "mxfp4"
    scale_suffixes = ("_blocks", "_scales")

    def __init__(self) -> None:
        from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

        self.names = {param: tuple(names) for param, names in serialized_names(Mxfp4HfQuantizer, "mxfp4").items()}

    def logical_tensors(self, physical: dict[str, TensorInfo], dtype: str) -> dict[str, LogicalTensor]:
        found = {}
        for key, info in physical.items():
            for param, (blocks_name, scales_name) in self.names.items():
                if not key.endswith(f".{blocks_name}"):
                    continue
                module = key[: -len(blocks_name) - 1]
                scales_key = f"{module}.{scales_name}"
                scales = physical.get(scales_key)
                if scales is None:
                    continue  # reported as an unpaired block by the caller
                if info.dtype != "U8" or scales.dtype != "U8" or len(info.shape) != 4 or tuple(scales.shape) != tuple(info.shape[:-1]):
                    raise UnsupportedDtypeError(
                        f"{key} is {info.dtype} {list(info.shape)} with scales {scales.dtype} {list(scales.shape)}; "
                        "streamq expects MXFP4 blocks U8 [experts, out, groups, 16] and U8 scales [experts, out, groups]"
                    )
                experts, rows, groups, width = info.shape
                shape = (experts, groups * width * 2, rows)
                logical = f"{module}.{param}"
                found[logical] = LogicalTensor(logical, (key, scales_key), TensorInfo(model_dtype_code(dtype), shape))
        return found

    def dequantize(self, tensor: LogicalTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        blocks, scales = (parts[key] for key in tensor.parts)
        return convert_moe_packed_tensors(blocks, scales, dtype=dtype)
