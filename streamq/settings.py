"""Quantization settings: the one record of everything that decides the output bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .surface import remedy

BNB_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit (converters/bitsandbytes.py)
INT4_TYPES = ("int4",)  # compressed-tensors pack-quantized W4A16 (converters/int4.py)
DEQUANTIZED_TYPES = ("bf16",)  # a quantized source written dequantized (converters/bf16.py)
QUANT_TYPES = BNB_TYPES + INT4_TYPES + DEQUANTIZED_TYPES
FORMATS = ("safetensors", "gguf")
# GGUF (gguf/): llama.cpp's type names, any case. The converter writes bf16/f16/q8_0 itself; the others are
# llama-quantize's file types (its default per-tensor mixture) applied to the converter's bf16 file.
GGUF_CONVERTER_TYPES = ("bf16", "f16", "q8_0")
GGUF_QUANTIZE_TYPES = ("q4_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")
GGUF_TYPES = GGUF_QUANTIZE_TYPES + GGUF_CONVERTER_TYPES
DEFAULT_QUANT_TYPE = {"safetensors": "nf4", "gguf": "q4_k_m"}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT4_GROUP_SIZES = (32, 64, 128)
# int4's default group size is llm-compressor's W4A16 preset (128); a QAT checkpoint trained on
# Q4_0-style groups of 32 needs blocksize=32 to stay exact (the summary and card say how many were).
DEFAULT_BLOCKSIZE = {"nf4": 64, "fp4": 64, "int4": 128, "bf16": 64}  # bf16 has no blocks: 64 is unused
# Output shards are cut at this size whatever the source's shards are: small enough for a small disk
# (two are on it at once) and for a crash to cost little (at most one is made again).
DEFAULT_MAX_SHARD_SIZE = "1GB"


@dataclass(frozen=True)
class QuantSettings:
    """The options that decide the output bytes; a resumed run must use the same ones."""

    quant_type: str | None = None  # None: the format's default (DEFAULT_QUANT_TYPE)
    double_quant: bool = True
    blocksize: int | None = None  # None: the quant type's default (DEFAULT_BLOCKSIZE)
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] | None = field(default=None)
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE  # bytes, or transformers' spelling ("1GB", "500MB")
    format: str = "safetensors"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        object.__setattr__(self, "max_shard_size", _size(self.max_shard_size))
        if self.quant_type is None:
            object.__setattr__(self, "quant_type", DEFAULT_QUANT_TYPE[self.format])
        if self.format == "gguf":
            self._check_gguf()
            return
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.blocksize is None:
            object.__setattr__(self, "blocksize", DEFAULT_BLOCKSIZE[self.quant_type])
        if self.quant_type in INT4_TYPES:
            self._check_int4()
        elif self.blocksize not in BNB_BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two between 32 and 4096, got {self.blocksize}")
        if self.skip_modules is not None:
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    def _check_int4(self) -> None:
        if self.blocksize not in INT4_GROUP_SIZES:
            raise ValueError(f"blocksize (the int4 group size) must be one of {INT4_GROUP_SIZES}, got {self.blocksize}")
        if not self.double_quant or self.compute_dtype != "bfloat16":
            raise ValueError(
                "double_quant and compute_dtype are bitsandbytes settings; int4 has neither: "
                f"{remedy('drop_bnb_options')}, or choose nf4 or fp4"
            )

    def _check_gguf(self) -> None:
        object.__setattr__(self, "quant_type", str(self.quant_type).lower())
        if self.quant_type not in GGUF_TYPES:
            raise ValueError(f"quant_type for GGUF must be one of llama.cpp's {', '.join(GGUF_TYPES)} (any case), got {self.quant_type!r}")
        meaningless = [name for name, value, default in (
            ("double_quant", self.double_quant, True), ("blocksize", self.blocksize, None),
            ("compute_dtype", self.compute_dtype, "bfloat16"), ("skip_modules", self.skip_modules, None),
        ) if value != default]
        if meaningless:
            verb, pronoun = ("mean", "them") if len(meaningless) > 1 else ("means", "it")
            raise ValueError(f"{', '.join(meaningless)} {verb} nothing for GGUF (llama.cpp decides each tensor's type); leave {pronoun} out")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.format == "safetensors":
            del data["format"]  # as manifests written before GGUF say it: they resume unchanged
        data["skip_modules"] = list(self.skip_modules) if self.skip_modules is not None else None
        return data


def _size(value: int | str) -> int:
    """`max_shard_size` in bytes, read as transformers' `save_pretrained` reads it."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            value = parse_size_to_int(value)
        except ValueError as exc:
            raise ValueError(f"max_shard_size must be bytes or a size such as '1GB' or '500MB', got {value!r}") from exc
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {value!r}")
    return value
