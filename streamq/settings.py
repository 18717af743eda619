"""Quantization settings, and their translation into what transformers writes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class QuantSettings:
    """The options that decide the output bytes; a resumed run must use the same ones."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two between 32 and 4096, got {self.blocksize}")
        if self.skip_modules is not None:
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    def bnb_config(self) -> Any:
        """The `BitsAndBytesConfig` a user would pass to `from_pretrained` for the same result."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=list(self.skip_modules) if self.skip_modules is not None else None,
        )

    def quantization_config(self) -> dict[str, Any]:
        """The `quantization_config` block transformers writes into config.json."""
        return self.bnb_config().to_dict()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skip_modules"] = list(self.skip_modules) if self.skip_modules is not None else None
        return data
