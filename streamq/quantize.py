"""Quantize one shard's tensors exactly as transformers + bitsandbytes would when loading in 4 bit."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptShardError
from .plan import Plan
from .settings import QuantSettings
from .targets import FLOAT_CODES, TensorRule


def quantize_shard(path: Path, name: str, keys: tuple[str, ...], rules: dict[str, TensorRule], settings: QuantSettings, device: str) -> dict[str, torch.Tensor]:
    """Return the output tensors of one shard, keyed by the names transformers would save.

    Tensors are read one at a time, so memory holds the output shard and about one input tensor,
    never the whole input shard.
    """
    out: dict[str, torch.Tensor] = {}
    reader = _WindowedReader(path)
    try:
        for key in keys:
            rule = rules[key]
            if rule.action == "drop":
                continue
            tensor = reader.get_tensor(key)
            if rule.dtype is not None:
                tensor = tensor.to(getattr(torch, rule.dtype))
            if rule.action == "keep":  # an own copy, or it would keep its whole window of the file mapped
                out[rule.out_key] = tensor.clone(memory_format=torch.contiguous_format)
                continue
            if rule.transpose:
                tensor = tensor.T
            for suffix, value in quantize_weight(tensor.contiguous(), settings, device).items():
                out[f"{rule.out_key}{suffix}"] = value
    except SafetensorError as exc:
        raise CorruptShardError(f"{name}: cannot read tensors ({exc}); the file is corrupt or truncated") from exc
    return out


class _WindowedReader:
    """safetensors' memory-mapped reader, re-opened after every `window` bytes read.

    Every page a mapping has touched counts in the process's resident memory until the mapping is
    closed (and a mapping lives as long as any tensor taken from it), so one mapping for the whole
    shard would grow RSS by the shard's size. Re-opening bounds it by one window (or one tensor), at
    the price of parsing the header once per window.
    """

    def __init__(self, path: Path, window: int = 64 << 20) -> None:
        self.path, self.window = path, window
        self._file = None
        self._read = 0

    def get_tensor(self, key: str) -> torch.Tensor:
        if self._file is None or self._read >= self.window:
            self._file = safe_open(self.path, "pt")  # the old mapping goes once its tensors are freed
            self._read = 0
        tensor = self._file.get_tensor(key)
        self._read += tensor.numel() * tensor.element_size()
        return tensor


def warm_up(plan: Plan, device: str) -> None:
    """Quantize a small weight in each dtype the plan quantizes, so that loading the compiled kernel,
    checking it against bitsandbytes and starting CUDA happen while the first shard downloads."""
    dtypes = {
        rule.dtype or FLOAT_CODES.get(plan.tensor_info[key].dtype)
        for key, rule in plan.rules.items() if rule.action == "quantize" and key in plan.tensor_info
    }
    for dtype in sorted(d for d in dtypes if d is not None):
        quantize_weight(torch.ones(16, 4 * plan.settings.blocksize, dtype=getattr(torch, dtype)), plan.settings, device)


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
