"""The interface every output format implements, and the registry that picks one from the settings.

The pipeline (plan, quantize, write, finish, card, verify) is the same for every output format; what
differs is which layers the reference tool quantizes, which tensors it writes for one weight, and the
`quantization_config` it puts in config.json. Each output format is one `Converter` in its own module
(as compressed-tensors' `entrypoints/convert/` does for its converters), chosen by `converter_for`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..settings import QuantSettings


@dataclass(frozen=True)
class CardText:
    """The format-specific parts of the model card."""

    title: str  # e.g. "4-bit (NF4) bitsandbytes"
    tags: list[str]
    description: str  # markdown: what the format is, which tool writes the same bytes
    rows: list[tuple[str, str]]  # rows of the settings table
    loading: str  # markdown: how to load it and what that needs


HEADER_BYTES_PER_TENSOR = 160  # a safetensors header entry, generously: for the output size estimates

Stats = Counter  # per-shard counters a converter fills while it quantizes (e.g. grid-exact groups)


@runtime_checkable
class Converter(Protocol):
    """One output format. Methods are called from one thread at a time (the quantizer's)."""

    name: str  # what the card calls the format, e.g. "bitsandbytes"
    quantize_reason: str  # the plan's reason for a quantized tensor
    settings: QuantSettings

    def make_quantizer(self) -> Any:
        """transformers' quantizer object for this format (its weight conversion mapping depends on
        it), or None; made before the meta model, as `from_pretrained` does."""
        ...

    def prepare_meta_model(self, model: Any, quantizer: Any, dtype: torch.dtype) -> None:
        """Mark the layers the reference would quantize on `model` (built on the meta device, inside
        transformers' init context), as the reference does before loading weights."""
        ...

    def needs_quantization(self, model: Any, quantizer: Any, param_name: str) -> bool:
        """Whether the reference quantizes this parameter of the prepared meta model."""
        ...

    def quantizes_fused_source(self, model: Any, quantizer: Any, param_name: str, shape: tuple[int, ...]) -> bool:
        """Whether a checkpoint tensor of `shape` that transformers' conversion fuses into
        `param_name` (e.g. one expert's weight of a 3-D experts parameter) is quantized on its own,
        under its checkpoint name."""
        ...

    def quantize_weight(self, weight: torch.Tensor, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
        """The tensors written for one weight ([out, in], in the model dtype), keyed by the suffix
        appended to the weight's output key ("" is the key itself); contiguous CPU tensors."""
        ...

    def warm_up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A small weight whose quantization loads and checks everything the first real one needs."""
        ...

    def expected_size(self, shape: tuple[int, ...]) -> int:
        """Bytes (data plus safetensors header entries, generously) written for one quantized weight."""
        ...

    def config_block(self) -> Any:
        """What goes in config.json's `quantization_config`: a transformers quantization config object
        (saved by `config.save_pretrained`) or a plain dict; None writes no quantization_config."""
        ...

    def check_config(self, quantization_config: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
        """Problems with a finished output's `quantization_config`, given the manifest's settings."""
        ...

    def plan_note(self) -> str | None:
        """A line for the plan about what only the run can tell (None: nothing to say)."""
        ...

    def card(self, stats: Stats) -> CardText:
        """The model card's format-specific parts, given the run's totals of `stats`."""
        ...


@functools.cache  # asked once per weight; settings are frozen
def converter_for(settings: QuantSettings) -> Converter:
    """The converter that writes `settings.quant_type`."""
    if settings.quant_type in ("nf4", "fp4"):
        from .bitsandbytes import BitsAndBytesConverter

        return BitsAndBytesConverter(settings)
    if settings.quant_type == "int4":
        from .int4 import Int4Converter

        return Int4Converter(settings)
    if settings.quant_type == "bf16":
        from .bf16 import Bf16Converter

        return Bf16Converter(settings)
    raise ValueError(f"no output converter for quant_type {settings.quant_type!r}")
