"""Tiny checkpoints for the int4 output: ordinary random ones, QAT ones (weights put on a 4-bit grid),
and llm-compressor's `model_free_ptq` run on them in its own virtualenv as the reference.

Shared by tests/test_int4.py and benchmarks/int4_qat.py, so the figures measure what the tests assert.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
INPUT_IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 64]])
_TEXT = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)


def _gemma4(moe: bool) -> dict[str, Any]:
    """Gemma 4 text: sliding + global layers, the global ones with k=v attention (attention_k_eq_v)."""
    extra = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32) if moe else {}
    return dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, global_head_dim=32, max_position_embeddings=64, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], attention_k_eq_v=True, num_global_key_value_heads=1,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=128, tie_word_embeddings=True, **extra,
    )


FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (transformers config class, its fields)
    "llama": ("LlamaConfig", _TEXT),
    "qwen2": ("Qwen2Config", _TEXT),
    "qwen3": ("Qwen3Config", _TEXT | dict(head_dim=16)),
    "mistral": ("MistralConfig", _TEXT),
    "gemma": ("Gemma2Config", _TEXT | dict(head_dim=16, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", _TEXT | _MOE),
    "qwen2_moe": ("Qwen2MoeConfig", _TEXT | _QWEN_MOE),
    "gemma4": ("Gemma4TextConfig", _gemma4(False)),
    "gemma4_moe": ("Gemma4TextConfig", _gemma4(True)),
}


def make_model(path: Path, family: str, dtype: torch.dtype = torch.bfloat16, *, qat_group: int | None = None, seed: int = 0) -> Path:
    """Save a random model of `family`, sharded. With `qat_group`, every weight llm-compressor's rule
    quantizes (Linear layers but lm_head, and MoE experts) is first put on a Q4_0-style grid:
    w = dtype(s * q), q in [-8, 7], one positive scale s in `dtype` per group of `qat_group` inputs."""
    import transformers
    from transformers import AutoModelForCausalLM

    name, fields = FAMILIES[family]
    config = getattr(transformers, name)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if qat_group is not None:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if _quantized_by_reference(model, param_name, param):
                    param.copy_(on_grid(param.shape, qat_group, dtype, generator))
    model.save_pretrained(path, max_shard_size="60KB")
    return path


def _quantized_by_reference(model: Any, name: str, param: torch.Tensor) -> bool:
    module_name = name.rsplit(".", 1)[0]
    module = model.get_submodule(module_name)
    if isinstance(module, torch.nn.Linear):
        return name.endswith(".weight") and module_name != "lm_head"
    return param.dim() == 3 and ".experts." in f"{name}."


def on_grid(shape: torch.Size, group: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Weights of `shape` (last dim = inputs) that lie exactly on a symmetric 4-bit grid per group."""
    *lead, inputs = shape
    q = torch.randint(-8, 8, (*lead, inputs // group, group), generator=generator)
    scale = (torch.rand((*lead, inputs // group, 1), generator=generator) * 0.02 + 0.002).to(dtype)
    return (q.to(dtype) * scale).reshape(shape)


def reference_python() -> str | None:
    """The reference virtualenv's python: $STREAMQ_INT4_REFERENCE, else .ref-venv in the checkout."""
    path = os.environ.get("STREAMQ_INT4_REFERENCE") or str(HERE.parent / ".ref-venv" / "bin" / "python")
    return path if Path(path).exists() else None


def run_reference(python: str, src: Path, dst: Path, group_size: int, ignore: list[str]) -> None:
    """llm-compressor's model_free_ptq W4A16 with `ignore`, in the reference virtualenv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [python, str(HERE / "int4_reference.py"), str(src), str(dst), str(group_size), *ignore],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"model_free_ptq failed ({done.returncode}); see stderr")


def kept_modules(plan: Any) -> list[str]:
    """What streamq keeps, in model_free_ptq's terms: the module of every kept `*.weight` tensor
    (model_free_ptq otherwise quantizes every `.weight` not ending in "norm", embeddings included)."""
    return sorted(k.removesuffix(".weight") for k, r in plan.rules.items() if r.action == "keep" and k.endswith(".weight"))


def load_dequantized(path: Path) -> Any:
    """transformers' dequantized load of a compressed-tensors checkpoint (plain float weights)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False), device_map="cpu")


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits
