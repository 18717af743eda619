"""Write one output shard to the work directory, atomically, and describe it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .budget import is_disk_full
from .errors import StreamqError


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    size: int
    tensor_bytes: int
    keys: list[str]


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> WrittenShard:
    """Save with the same `{"format": "pt"}` metadata transformers uses; a partial file never has the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
    except (OSError, SafetensorError) as exc:
        partial.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise
        raise StreamqError(f"cannot write {path.name} in {path.parent}: {exc}; check the work_dir") from exc
    os.replace(partial, path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return WrittenShard(path, path.stat().st_size, tensor_bytes, sorted(tensors))
