"""A DeepSeek-V3-shaped FP8 MoE checkpoint for bench_pipeline.py's `--source fp8-moe`.

Block FP8 as DeepSeek publishes it: every projection weight e4m3 with a float32 `weight_scale_inv` per
128x128 block (partial blocks at the edges: kv_a_proj_with_mqa has kv_lora_rank + 64 rows), routers,
norms, embeddings and lm_head in bf16, `e_score_correction_bias` in float32; MLA attention, a few dense
layers, then MoE layers of many small experts plus a shared one, so that a shard holds hundreds of tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1_000_000
BLOCK = 128


@dataclass(frozen=True)
class MoESpec:
    hidden: int = 1024
    intermediate: int = 2816  # the dense layers' MLP
    moe_intermediate: int = 512
    experts: int = 64
    shared_experts: int = 1
    layers: int = 12
    dense_layers: int = 1
    heads: int = 8
    q_lora_rank: int = 384
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 64
    vocab: int = 32000
    shard_bytes: int = 300 * MB

    def weights(self) -> Iterator[tuple[str, tuple[int, ...], str]]:
        """(name, shape, kind) in DeepSeek-V3's checkpoint order; kind: fp8, bf16 or f32."""
        h, qk = self.hidden, self.qk_nope_head_dim + self.qk_rope_head_dim
        yield "model.embed_tokens.weight", (self.vocab, h), "bf16"
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,), "bf16"
            yield f"{p}.self_attn.q_a_proj.weight", (self.q_lora_rank, h), "fp8"
            yield f"{p}.self_attn.q_a_layernorm.weight", (self.q_lora_rank,), "bf16"
            yield f"{p}.self_attn.q_b_proj.weight", (self.heads * qk, self.q_lora_rank), "fp8"
            yield f"{p}.self_attn.kv_a_proj_with_mqa.weight", (self.kv_lora_rank + self.qk_rope_head_dim, h), "fp8"
            yield f"{p}.self_attn.kv_a_layernorm.weight", (self.kv_lora_rank,), "bf16"
            yield f"{p}.self_attn.kv_b_proj.weight", (self.heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank), "fp8"
            yield f"{p}.self_attn.o_proj.weight", (h, self.heads * self.v_head_dim), "fp8"
            yield f"{p}.post_attention_layernorm.weight", (h,), "bf16"
            if i < self.dense_layers:
                yield from _mlp(f"{p}.mlp", h, self.intermediate)
                continue
            yield f"{p}.mlp.gate.weight", (self.experts, h), "bf16"
            yield f"{p}.mlp.gate.e_score_correction_bias", (self.experts,), "f32"
            for e in range(self.experts):
                yield from _mlp(f"{p}.mlp.experts.{e}", h, self.moe_intermediate)
            yield from _mlp(f"{p}.mlp.shared_experts", h, self.moe_intermediate * self.shared_experts)
        yield "model.norm.weight", (h,), "bf16"
        yield "lm_head.weight", (self.vocab, h), "bf16"

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], str]]:
        """Every stored tensor: each FP8 weight followed by its weight_scale_inv."""
        for name, shape, kind in self.weights():
            yield name, shape, kind
            if kind == "fp8":
                yield name.removesuffix("weight") + "weight_scale_inv", tuple(math.ceil(d / BLOCK) for d in shape), "f32"

    def shards(self) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """Tensors grouped into shards of at most `shard_bytes`, a weight and its scale always together."""
        groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for name, shape, kind in self.tensors():
            nbytes = math.prod(shape) * {"fp8": 1, "bf16": 2, "f32": 4}[kind]
            if groups[-1] and size + nbytes > self.shard_bytes and not name.endswith("weight_scale_inv"):
                groups.append([])
                size = 0
            groups[-1].append((name, shape, kind))
            size += nbytes
        return groups

    def config(self) -> Any:
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            moe_intermediate_size=self.moe_intermediate, num_hidden_layers=self.layers, first_k_dense_replace=self.dense_layers,
            n_routed_experts=self.experts, n_shared_experts=self.shared_experts, num_experts_per_tok=8, n_group=8, topk_group=4,
            num_attention_heads=self.heads, num_key_value_heads=self.heads, q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
        )


def _mlp(prefix: str, hidden: int, intermediate: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    yield f"{prefix}.gate_proj.weight", (intermediate, hidden), "fp8"
    yield f"{prefix}.up_proj.weight", (intermediate, hidden), "fp8"
    yield f"{prefix}.down_proj.weight", (hidden, intermediate), "fp8"


def build_fp8_model(spec: MoESpec, dest: Path, seed: int) -> None:
    """config.json (with DeepSeek's quantization_config), the shards and the index; one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    spec.config().save_pretrained(dest)
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    groups = spec.shards()
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: _random(key, shape, kind, generator) for key, shape, kind in group}
        save_file(tensors, dest / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _random(name: str, shape: tuple[int, ...], kind: str, generator: Any) -> Any:
    """FP8 codes of unit-scale normal values; block scales near a trained model's (~1e-4); norms near 1."""
    import torch

    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if kind == "fp8":
        return values.to(torch.float8_e4m3fn)
    if name.endswith("weight_scale_inv"):
        return values.abs_().mul_(1e-4).add_(1e-5)
    if kind == "f32":
        return values.mul_(0.01)
    values.mul_(0.02)
    if name.endswith("norm.weight"):
        values.add_(1.0)
    return values.to(torch.bfloat16)
