"""Quantize one weight exactly as the output format's reference tool would (see `converters`)."""

from __future__ import annotations

import torch

from .converters import Stats, converter_for
from .plan import Plan
from .settings import QuantSettings
from .targets import FLOAT_CODES


def warm_up(plan: Plan, device: str) -> None:
    """Quantize a small weight in each dtype the plan quantizes, so that loading the compiled kernel,
    checking it against bitsandbytes and starting CUDA happen while the first shard downloads."""
    dtypes = {
        rule.dtype or FLOAT_CODES.get(plan.tensor_info[key].dtype)
        for key, rule in plan.rules.items() if rule.action == "quantize" and key in plan.tensor_info
    }
    converter = converter_for(plan.settings)
    for dtype in sorted(d for d in dtypes if d is not None):
        quantize_weight(converter.warm_up_weight(getattr(torch, dtype)), plan.settings, device)


def quantize_weight(weight: torch.Tensor, settings: QuantSettings, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
    """The tensors written for one weight, keyed by suffix, by the output format's converter."""
    return converter_for(settings).quantize_weight(weight, device, stats)
