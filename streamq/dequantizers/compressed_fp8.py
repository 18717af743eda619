"""compressed-tensors FP8 sources (`quant_method: "compressed-tensors"`, format `float-quantized`):
e4m3 weights with a `weight_scale` per channel or per tensor (and an activation `input_scale`, which a
dequantized model does not have, so planning drops it).

This is what transformers' `CompressedTensorsDequantize` does for a dense layer, step for step: the
weight's serialized names (`CompressedTensorsHfQuantizer.serialized_names`) that the checkpoint holds,
the dense config group (`get_dense_scheme`), that group's compressor from compressed-tensors' registry,
its `decompress`, then a cast to the model dtype. For MoE experts transformers multiplies weight and
scale in float32 itself instead; that is the same product, rounded once to the model dtype, and the
DeepSeek-shaped test checks the bytes agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import StreamqError
from ..targets import TensorInfo
from .base import LogicalTensor, NotDequantizable, model_dtype_code, serialized_names

if TYPE_CHECKING:
    import torch

FORMAT = "float-quantized"


class CompressedFP8Dequantizer:
    method = "compressed-tensors"
    scale_suffixes = (".weight_scale",)

    def __init__(self, ct_config: Any) -> None:
        from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

        self.names = serialized_names(CompressedTensorsHfQuantizer, self.method)["weight"]
        from transformers.integrations.compressed_tensors import get_dense_scheme  # also 5.25 and later

        self.scheme = get_dense_scheme(ct_config)
        self.format = self.scheme.format or ct_config.format

    @classmethod
    def from_config(cls, quant: dict[str, Any]) -> CompressedFP8Dequantizer:
        if quant.get("format") != FORMAT:
            raise NotDequantizable(f"its format is {quant.get('format')!r}, and streamq dequantizes compressed-tensors FP8 ({FORMAT}) only")
        try:
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError as exc:
            raise StreamqError(
                "dequantizing a compressed-tensors FP8 source needs the compressed-tensors package: pip install 'compressed-tensors>=0.20'"
            ) from exc
        try:
            config = QuantizationConfig.model_validate(quant)
        except ValueError as exc:  # pydantic's ValidationError
            raise NotDequantizable(f"compressed-tensors cannot read its quantization_config ({str(exc).splitlines()[0]})") from exc
        groups = list(config.config_groups.values())
        formats = {group.format or config.format for group in groups}
        if not groups or formats != {FORMAT} or not all(g.weights is not None and g.weights.type == "float" and g.weights.num_bits == 8 for g in groups):
            raise NotDequantizable(f"its config groups are not all FP8 {FORMAT} weights, and streamq dequantizes those only")
        return cls(config)

    def logical_tensors(self, physical: dict[str, TensorInfo], dtype: str) -> dict[str, LogicalTensor]:
        weight = self.names[0]
        found = {}
        for key, info in physical.items():
            module, _, param = key.rpartition(".")
            if param != weight or info.dtype != "F8_E4M3" or f"{module}.weight_scale" not in physical:
                continue
            parts = (key,) + tuple(f"{module}.{n}" for n in self.names[1:] if f"{module}.{n}" in physical)
            found[key] = LogicalTensor(key, parts, TensorInfo(model_dtype_code(dtype), tuple(info.shape)))
        return found

    def dequantize(self, tensor: LogicalTensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        from compressed_tensors.compressors import BaseCompressor

        module = tensor.key.rpartition(".")[0]
        state_dict = {key[len(module) + 1:]: parts[key] for key in tensor.parts}
        compressor = BaseCompressor.get_value_from_registry(self.format)
        return compressor.decompress(state_dict, self.scheme)["weight"].to(dtype)
