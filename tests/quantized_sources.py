"""Tiny quantized checkpoints as their publishers write them (block FP8, compressed-tensors FP8, MXFP4),
and the references: transformers' (or compressed-tensors') dequantization, saved."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

BLOCK_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
PROJ = re.compile(r"_proj(_with_mqa)?\.weight$")  # the Linear weights FP8 releases quantize (never lm_head, norms, routers)


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )


def deepseek_config(kv_lora_rank: int = 128):
    """DeepSeek-V3 in small: MLA (q/kv low-rank projections), one dense layer, then MoE with a shared expert.
    kv_a_proj_with_mqa has kv_lora_rank + 16 rows: 144 by default, not a multiple of the 128 block (as 576 is
    in DeepSeek-V3)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=128, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
    )


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
    )


def _save_random(config, path: Path, seed: int, max_shard_size: str) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path, max_shard_size=max_shard_size)
    return {f.name: f for f in sorted(path.glob("*.safetensors"))}


def _rewrite(path: Path, convert, quantization_config: dict) -> Path:
    """Replace each shard's tensors by `convert(key, tensor) -> {key: tensor}` and declare the quantization."""
    weight_map = {}
    for shard in sorted(path.glob("*.safetensors")):
        out = {}
        for key, tensor in load_file(shard).items():
            out.update(convert(key, tensor))
        save_file(out, shard, metadata={"format": "pt"})
        weight_map.update({key: shard.name for key in out})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def block_fp8_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization: one float32 scale (absmax / 448) per block, partial blocks at the edges."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def make_block_fp8(path: Path, family: str = "llama", seed: int = 0, max_shard_size: str = "300KB") -> Path:
    """A block-FP8 checkpoint: Llama quantized by transformers' own `Fp8Quantize`, DeepSeek-V3 by DeepSeek's
    scheme (which also covers dimensions that are not block multiples)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = llama_config() if family == "llama" else deepseek_config()
    _save_random(config, path, seed, max_shard_size)
    tf_quantize = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128])))

    def convert(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not PROJ.search(key):
            return {key: tensor}
        if family == "llama":
            return tf_quantize.convert({key: tensor})
        q, scale = block_fp8_quantize(tensor)
        return {key: q, key.removesuffix("weight") + "weight_scale_inv": scale}

    return _rewrite(path, convert, dict(BLOCK_FP8))


def make_compressed_fp8(path: Path, family: str = "llama", seed: int = 0, max_shard_size: str = "300KB") -> Path:
    """A compressed-tensors FP8_DYNAMIC checkpoint (per-channel weight scales), as llm-compressor writes it;
    for "deepseek" the MoE experts too (transformers dequantizes those through its fused-experts path)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    _save_random(llama_config() if family == "llama" else deepseek_config(), path, seed, max_shard_size)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="float-quantized", ignore=["lm_head"],
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    scheme.format = "float-quantized"
    compressor = BaseCompressor.get_value_from_registry("float-quantized")

    def convert(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not PROJ.search(key):
            return {key: tensor}
        scale = (tensor.float().abs().amax(dim=1, keepdim=True) / 448.0).to(tensor.dtype)
        module = key.removesuffix(".weight")
        compressed = compressor.compress({"weight": tensor, "weight_scale": scale}, scheme)
        return {f"{module}.{name}": value for name, value in compressed.items()}

    return _rewrite(path, convert, config.to_dict() if hasattr(config, "to_dict") else config.model_dump())


def make_mxfp4(path: Path, seed: int = 0, max_shard_size: str = "60KB") -> Path:
    """A gpt-oss checkpoint whose experts are MXFP4 `_blocks`/`_scales` (random codes and exponents) as OpenAI ships it."""
    _save_random(gpt_oss_config(), path, seed, max_shard_size)
    generator = torch.Generator().manual_seed(seed + 1)

    def convert(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {key: tensor}
        experts, rows_in, out = tensor.shape  # stored [experts, in, out]; blocks are [experts, out, in/32, 16]
        return {
            key + "_blocks": torch.randint(0, 256, (experts, out, rows_in // 32, 16), dtype=torch.uint8, generator=generator),
            key + "_scales": torch.randint(121, 128, (experts, out, rows_in // 32), dtype=torch.uint8, generator=generator),
        }

    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return _rewrite(path, convert, quant)


def transformers_dequantized(src: Path, out: Path, quantization_config) -> Path:
    """What a user gets from transformers: the checkpoint loaded dequantized, then `save_pretrained`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=quantization_config, device_map="cpu")
    model.save_pretrained(out)
    return out
