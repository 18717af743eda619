"""Quantize one shard's tensors exactly as transformers + bitsandbytes would when loading in 4 bit."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptShardError
from .settings import QuantSettings
from .targets import TensorRule


def quantize_shard(path: Path, name: str, keys: tuple[str, ...], rules: dict[str, TensorRule], settings: QuantSettings, device: str) -> dict[str, torch.Tensor]:
    """Return the output tensors of one shard, keyed by the names transformers would save.

    Tensors are read one at a time from the memory-mapped file, so memory holds the output shard
    and one input tensor, never the whole model.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in keys:
                rule = rules[key]
                if rule.action == "drop":
                    continue
                tensor = f.get_tensor(key)
                if rule.dtype is not None:
                    tensor = tensor.to(getattr(torch, rule.dtype))
                if rule.action == "keep":
                    out[rule.out_key] = tensor.contiguous()
                    continue
                if rule.transpose:
                    tensor = tensor.T
                for suffix, value in quantize_weight(tensor.contiguous(), settings, device).items():
                    out[f"{rule.out_key}{suffix}"] = value
    except SafetensorError as exc:
        raise CorruptShardError(f"{name}: cannot read tensors ({exc}); the file is corrupt or truncated") from exc
    return out


def quantize_weight(weight: torch.Tensor, settings: QuantSettings, device: str) -> dict[str, torch.Tensor]:
    """The tensors `Linear4bit` saves for one weight: packed data plus its quant state, keyed by suffix."""
    import bitsandbytes.functional as F

    if device == "cpu" and _kernel_supports(weight, settings):
        from .kernels import cpu

        packed, state = cpu.quantize_4bit(
            weight, quant_type=settings.quant_type, blocksize=settings.blocksize, compress_statistics=settings.double_quant
        )
    else:
        packed, state = F.quantize_4bit(
            weight.to(device),
            blocksize=settings.blocksize,
            compress_statistics=settings.double_quant,
            quant_type=settings.quant_type,
            quant_storage=torch.uint8,
        )
    tensors = {"": packed}
    tensors.update({f".{k}": v for k, v in state.as_dict(packed=True).items()})
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def _kernel_supports(weight: torch.Tensor, settings: QuantSettings) -> bool:
    """Use streamq's fast CPU kernel unless it cannot run here (or STREAMQ_CPU_KERNEL=0 asks for bitsandbytes)."""
    if os.environ.get("STREAMQ_CPU_KERNEL", "1") == "0":
        return False
    try:
        from .kernels import cpu
    except ImportError:
        return False
    return cpu.supports(weight, settings.quant_type, settings.blocksize)
