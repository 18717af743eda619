"""bf16: the dequantized checkpoint itself, as transformers' `save_pretrained` writes it after loading a
quantized source with `dequantize=True` (every tensor kept in the model dtype, no quantization_config).

Nothing is quantized: the plan keeps every tensor, so this converter only answers for the config and the
card. It is meant for quantized sources (see `streamq.dequantizers`), whose model dtype is bfloat16.
"""

from __future__ import annotations

from typing import Any

import torch

from ..settings import QuantSettings
from .base import CardText, Stats


class Bf16Converter:
    name = "bf16 (dequantized)"
    quantize_reason = "never: the bf16 output keeps every tensor"

    def __init__(self, settings: QuantSettings) -> None:
        self.settings = settings

    def make_quantizer(self) -> Any:
        return None  # transformers' plain load: no quantizer, no layer replaced

    def prepare_meta_model(self, model: Any, quantizer: Any, dtype: torch.dtype) -> None:
        return None

    def needs_quantization(self, model: Any, quantizer: Any, param_name: str) -> bool:
        return False

    def quantizes_fused_source(self, model: Any, quantizer: Any, param_name: str, shape: tuple[int, ...]) -> bool:
        return False

    def quantize_weight(self, weight: torch.Tensor, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
        raise AssertionError("the bf16 output quantizes nothing; the plan keeps every tensor")

    def warm_up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ones(1, dtype=dtype)

    def expected_size(self, shape: tuple[int, ...]) -> int:
        return 0  # no tensor is quantized; kept tensors are sized by the plan

    def config_block(self) -> Any:
        return None

    def check_config(self, quantization_config: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
        return [] if not quantization_config else [f"config.json has a quantization_config ({quantization_config.get('quant_method')!r}); the bf16 output should have none"]

    def plan_note(self) -> str | None:
        return None

    def card(self, stats: Stats) -> CardText:
        return CardText(
            title="bf16 (dequantized)",
            tags=["bf16", "dequantized"],
            description=(
                "The weights are the same bytes `transformers` writes when it loads the quantized source with\n"
                "`dequantize=True` (e.g. `FineGrainedFP8Config(dequantize=True)`) and calls `save_pretrained`."
            ),
            rows=[("dtype", "`bfloat16`")],
            loading="A plain `transformers` checkpoint: nothing beyond `transformers` is needed.",
        )
