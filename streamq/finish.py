"""The files that turn published shards into a loadable model; they are published last."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .converters import converter_for
from .manifest import Manifest
from .plan import Plan


def output_config(plan: Plan, config_dir: Path, trust_remote_code: bool) -> bytes:
    """config.json as transformers' own `save_pretrained` writes it for the 4-bit model."""
    block = converter_for(plan.settings).config_block()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
        if block is not None:
            config.quantization_config = block
        config.dtype = plan.tensors.dtype
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            return (Path(tmp) / "config.json").read_bytes()
    except (ValueError, KeyError, OSError):  # an architecture transformers does not know: patch the JSON
        data = dict(plan.config)
        if block is not None:
            data["quantization_config"] = block if isinstance(block, dict) else block.to_dict()
        data["dtype"] = plan.tensors.dtype
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def output_index(plan: Plan, manifest: Manifest) -> bytes:
    """model.safetensors.index.json covering every output key, with the metadata transformers writes."""
    weight_map = {key: entry.output_name for entry in manifest.shards.values() for key in entry.keys}
    index = {
        "metadata": {
            "total_parameters": plan.tensors.total_parameters,
            "total_size": sum(entry.tensor_bytes for entry in manifest.shards.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
