"""bitsandbytes NF4/FP4: the bytes transformers' `load_in_4bit` + `save_pretrained` write."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..bnb import bitsandbytes_functional
from ..settings import QuantSettings
from .base import HEADER_BYTES_PER_TENSOR, CardText, Stats

_QUANT_STATE_JSON = 220


class BitsAndBytesConverter:
    """Linear4bit's saved state, from streamq's CPU kernel or bitsandbytes itself (identical bytes)."""

    name = "bitsandbytes"
    quantize_reason = "nn.Linear replaced by Linear4bit"

    def __init__(self, settings: QuantSettings) -> None:
        self.settings = settings

    def bnb_config(self) -> Any:
        """The `BitsAndBytesConfig` a user would pass to `from_pretrained` for the same result."""
        from transformers import BitsAndBytesConfig

        s = self.settings
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=s.quant_type,
            bnb_4bit_use_double_quant=s.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, s.compute_dtype),
            llm_int8_skip_modules=list(s.skip_modules) if s.skip_modules is not None else None,
        )

    def make_quantizer(self) -> Any:
        from transformers.quantizers import AutoHfQuantizer

        bitsandbytes_functional()  # before transformers' bitsandbytes integration imports it
        return AutoHfQuantizer.from_config(self.bnb_config(), pre_quantized=False)

    def prepare_meta_model(self, model: Any, quantizer: Any, dtype: torch.dtype) -> None:
        """transformers' own bitsandbytes quantizer replaces the Linear layers it would quantize."""
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None)

    def needs_quantization(self, model: Any, quantizer: Any, param_name: str) -> bool:
        return bool(quantizer.param_needs_quantization(model, param_name))

    def quantizes_fused_source(self, model: Any, quantizer: Any, param_name: str, shape: tuple[int, ...]) -> bool:
        return False  # transformers never converts fused expert parameters to Linear4bit

    def quantize_weight(self, weight: torch.Tensor, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
        """The tensors `Linear4bit` saves for one weight: packed data plus its quant state, keyed by suffix."""
        s = self.settings
        if device == "cpu" and _kernel_supports(weight, s):
            from ..kernels import cpu

            packed, state = cpu.quantize_4bit(weight, quant_type=s.quant_type, blocksize=s.blocksize, compress_statistics=s.double_quant)
        else:
            packed, state = bitsandbytes_functional().quantize_4bit(
                weight.to(device), blocksize=s.blocksize, compress_statistics=s.double_quant, quant_type=s.quant_type,
                quant_storage=torch.uint8,
            )
        tensors = {"": packed}
        tensors.update({f".{k}": v for k, v in state.as_dict(packed=True).items()})
        return {k: v.cpu().contiguous() for k, v in tensors.items()}

    def warm_up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ones(16, 4 * self.settings.blocksize, dtype=dtype)

    def expected_size(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for dim in shape:
            numel *= dim
        blocks = -(-numel // self.settings.blocksize)
        total = -(-numel // 2) + 64 + _QUANT_STATE_JSON + 4 * HEADER_BYTES_PER_TENSOR
        if self.settings.double_quant:
            total += blocks + 4 * -(-blocks // 256) + 1024 + 2 * HEADER_BYTES_PER_TENSOR
        else:
            total += 4 * blocks
        return total

    def config_block(self) -> Any:
        return self.bnb_config()

    def check_config(self, quantization_config: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
        quant = quantization_config or {}
        expected = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": settings["quant_type"],
            "bnb_4bit_use_double_quant": settings["double_quant"],
        }
        return [
            f"config.json quantization_config[{key!r}] is {quant.get(key)!r}, expected {value!r}"
            for key, value in expected.items() if quant.get(key) != value
        ]

    def plan_note(self) -> str | None:
        return None

    def card(self, stats: Stats) -> CardText:
        s = self.settings
        kept = ", ".join(f"`{m}`" for m in s.skip_modules) if s.skip_modules else "transformers' defaults (lm_head, tied weights, keep-in-fp32 modules)"
        return CardText(
            title=f"4-bit ({s.quant_type.upper()}) bitsandbytes",
            tags=["bitsandbytes", "4-bit", s.quant_type],
            description=(
                "The weights are\nthe same bytes `transformers` + `bitsandbytes` would write for\n"
                "`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` followed by `save_pretrained`."
            ),
            rows=[
                ("quant_type", f"`{s.quant_type}`"),
                ("double quant", f"`{s.double_quant}`"),
                ("blocksize", f"`{s.blocksize}`"),
                ("compute dtype", f"`{s.compute_dtype}`"),
                ("kept in full precision", kept),
            ],
            loading="Needs `bitsandbytes` and `accelerate` installed.",
        )


def _kernel_supports(weight: torch.Tensor, settings: QuantSettings) -> bool:
    """Use streamq's fast CPU kernel unless it cannot run here (or STREAMQ_CPU_KERNEL=0 asks for bitsandbytes)."""
    if os.environ.get("STREAMQ_CPU_KERNEL", "1") == "0":
        return False
    try:
        from ..kernels import cpu
    except ImportError:
        return False
    return cpu.supports(weight, settings.quant_type, settings.blocksize)
