"""Tiny random checkpoints of many transformers architectures, and the parity check run on each.

Shared by tests/test_architectures.py and benchmarks/architecture_report.py, so the report measures
exactly what the tests assert. Each case builds a random model from a tiny config, saves it sharded
(optionally rewriting its keys the way old or foreign checkpoints look), and compares streamq's
output with transformers' own `from_pretrained(load_in_4bit)` + `save_pretrained` of that checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiny_models import bnb_config, byte_mismatches, load_tensors

VOCAB = 128
Tensors = dict[str, torch.Tensor]


def _text(**extra: Any) -> dict[str, Any]:
    """The tiny decoder shape every text family shares, plus family-specific fields."""
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return base | extra


def _config(name: str, **kwargs: Any) -> Callable[[], Any]:
    """A deferred `transformers.<name>(**kwargs)`: transformers is imported only when a case runs."""

    def build() -> Any:
        import transformers

        return getattr(transformers, name)(**kwargs)

    return build


def text_inputs(config: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 42, 7, 3, 100, 64]])}


def seq2seq_inputs(config: Any) -> dict[str, torch.Tensor]:
    return text_inputs(config) | {"decoder_input_ids": torch.tensor([[0, 17, 33, 2]])}


def llava_inputs(config: Any) -> dict[str, torch.Tensor]:
    """One 16x16 image: (16/8)^2 = 4 patch tokens once the CLS token is dropped."""
    image = config.image_token_id
    return {"input_ids": torch.tensor([[1, image, image, image, image, 9, 42, 7]]), "pixel_values": _pixels(16)}


def paligemma_inputs(config: Any) -> dict[str, torch.Tensor]:
    """One 16x16 image: (16/8)^2 = 4 image tokens ahead of the text."""
    image = config.image_token_id
    return {"input_ids": torch.tensor([[image] * 4 + [2, 9, 42, 7]]), "pixel_values": _pixels(16)}


def gemma3_vlm_inputs(config: Any) -> dict[str, torch.Tensor]:
    image = config.image_token_id
    ids = [2, config.boi_token_id] + [image] * config.mm_tokens_per_image + [config.eoi_token_id, 9, 42]
    return {"input_ids": torch.tensor([ids]), "pixel_values": _pixels(16), "token_type_ids": torch.tensor([[int(i == image) for i in ids]])}


def qwen2_vl_inputs(config: Any) -> dict[str, torch.Tensor]:
    """One image of 2x2 patches (8x8 pixels), merged 2x2 into a single image token."""
    vision = config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(1)
    ids = [1, config.vision_start_token_id, config.image_token_id, config.vision_end_token_id, 9, 42]
    return {
        "input_ids": torch.tensor([ids]),
        "mm_token_type_ids": torch.tensor([[int(i == config.image_token_id) for i in ids]]),
        "pixel_values": torch.randn(4, patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }


def vit_inputs(config: Any) -> dict[str, torch.Tensor]:
    return {"pixel_values": _pixels(16)}


def whisper_inputs(config: Any) -> dict[str, torch.Tensor]:
    features = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=torch.Generator().manual_seed(1))
    return {"input_features": features, "decoder_input_ids": torch.tensor([[1, 5, 9]])}


def clip_inputs(config: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 42]]), "pixel_values": _pixels(16)}


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def strip_prefix(prefix: str) -> Callable[[Tensors], Tensors]:
    """Keys as a checkpoint saved without the base-model prefix has them, head included."""
    return lambda tensors: {k.removeprefix(prefix): v for k, v in tensors.items()}


def base_model_only(prefix: str) -> Callable[[Tensors], Tensors]:
    """What the base-model class saves (or old BLOOM checkpoints hold): its own weights, no prefix, no head."""
    return lambda tensors: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def add_rotary_inv_freq(tensors: Tensors) -> Tensors:
    """Old Llama checkpoints carried each layer's rotary `inv_freq` buffer; transformers ignores it."""
    layers = sorted({k.split(".self_attn.")[0] for k in tensors if ".self_attn." in k})
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    return tensors | {f"{layer}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for layer in layers}


def legacy_bert(tensors: Tensors) -> Tensors:
    """TF-era BERT: LayerNorm.gamma/beta (renamed on load and back on save) and a saved position_ids buffer (dropped)."""
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    return renamed | {"bert.embeddings.position_ids": torch.arange(64).unsqueeze(0)}


def all_fp32(tensors: Tensors) -> Tensors:
    """Weights stored in fp32 while config.json says bfloat16: transformers casts before quantizing."""
    return {k: v.float() for k, v in tensors.items()}


def original_gpt2(tensors: Tensors) -> Tensors:
    """The layout of openai-community/gpt2: no `transformer.` prefix, no lm_head, causal-mask buffers saved."""
    out = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    for layer in sorted({k.split(".attn.")[0] for k in out if ".attn." in k}):
        out[f"{layer}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        out[f"{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def embeddings_and_norms_in_fp32(tensors: Tensors) -> Tensors:
    """A checkpoint mixing dtypes: embeddings and norms in fp32, written first so the first shard holds them."""
    fp32 = {k: v.float() for k, v in tensors.items() if "embed" in k or "norm" in k}
    return fp32 | {k: v for k, v in tensors.items() if k not in fp32}


def tied_copies(*names: str) -> Callable[[Tensors], Tensors]:
    """Old checkpoints also stored the weights tied to the input embedding; transformers saves one of them."""
    return lambda tensors: tensors | {name: tensors["shared.weight"].clone() for name in names}


def only_lm_head(tensors: Tensors) -> Tensors:
    """A tied checkpoint that stored the output embedding instead of the input one: transformers ties the other way."""
    out = {k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"}
    return out | {"lm_head.weight": tensors["model.embed_tokens.weight"]}


def distinct_lm_head(tensors: Tensors) -> Tensors:
    """config.json says tied, but the checkpoint stores an lm_head with other values: transformers unties them."""
    embed = tensors["model.embed_tokens.weight"]
    return tensors | {"lm_head.weight": torch.randn(embed.shape, generator=torch.Generator().manual_seed(2)).to(embed.dtype)}


@dataclass(frozen=True)
class ArchCase:
    """One architecture (or checkpoint layout) to requantize and compare with transformers."""

    name: str
    config: Callable[[], Any]
    auto: str = "AutoModelForCausalLM"  # the Auto class that loads both the reference and streamq's output
    dtype: torch.dtype = torch.bfloat16
    inputs: Callable[[Any], dict[str, torch.Tensor]] = text_inputs
    source_class: str | None = None  # build the source with this class instead of the Auto class
    original_format: bool = True  # False: save the source in transformers' loaded layout (fused MoE experts)
    edit: Callable[[Tensors], Tensors] | None = None  # rewrite the saved checkpoint's keys/tensors
    drop_config_dtype: bool = False  # config.json without dtype: transformers reads it from the weights
    skip_modules: tuple[str, ...] | None = None
    outputs_xfail: str | None = None  # why transformers itself cannot produce or reload outputs for this case


LLAMA = _config("LlamaConfig", **_text())
GEMMA2 = _config("Gemma2Config", **_text(head_dim=16, tie_word_embeddings=True))
GEMMA3_TEXT = _text(head_dim=16, tie_word_embeddings=True, sliding_window=8)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
QWEN2_MOE = _config(
    "Qwen2MoeConfig", **_text(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
)
GPT2 = _config("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
BERT = _config(
    "BertConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
)
NOMIC_BERT = _config(
    "NomicBertConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=64, pad_token_id=0,
)
T5 = _config("T5Config", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0)

CASES: list[ArchCase] = [
    # Decoder LLMs.
    ArchCase("llama", LLAMA),
    ArchCase("mistral", _config("MistralConfig", **_text(head_dim=16)), dtype=torch.float16),
    ArchCase("qwen2", _config("Qwen2Config", **_text())),
    ArchCase("qwen3", _config("Qwen3Config", **_text(head_dim=16)), dtype=torch.float32),
    ArchCase("gemma2 (tied)", GEMMA2),
    ArchCase("gemma3 text (tied)", _config("Gemma3TextConfig", **GEMMA3_TEXT), dtype=torch.float16),
    ArchCase("phi3 (fused qkv, gate_up)", _config("Phi3Config", **_text(pad_token_id=0, bos_token_id=1, eos_token_id=2))),
    ArchCase(
        "gpt-neox",
        _config("GPTNeoXConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    ),
    ArchCase(
        "falcon (FalconLinear: not quantized)",
        _config("FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
        dtype=torch.float16,
    ),
    ArchCase(
        "opt",
        _config("OPTConfig", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
    ),
    ArchCase("gpt2 (Conv1D)", GPT2),
    ArchCase(
        "jamba (hybrid Mamba/attention, MoE)",
        _config(
            "JambaConfig",
            **_text(
                num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
            ),
        ),
    ),
    ArchCase(
        "mamba (state space)",
        _config("MambaConfig", vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4),
        outputs_xfail="transformers' 4-bit Mamba cannot run on CPU: its slow path multiplies dt_proj.weight (packed 4-bit) directly",
    ),
    # Mixture of experts: fused into 3-D parameters at load, written back per expert, never quantized.
    ArchCase("mixtral (MoE)", _config("MixtralConfig", **_text(head_dim=16, num_local_experts=4, num_experts_per_tok=2))),
    ArchCase("qwen2-moe (MoE, shared expert)", QWEN2_MOE),
    ArchCase("qwen2-moe, experts saved fused", QWEN2_MOE, original_format=False),
    ArchCase("olmoe (MoE)", _config("OlmoeConfig", **_text(intermediate_size=32, num_experts=4, num_experts_per_tok=2)), dtype=torch.float32),
    ArchCase(
        "deepseek-v3 (MLA, MoE, fp32 router bias)",
        _config(
            "DeepseekV3Config",
            **_text(
                num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                n_group=1, topk_group=1,
            ),
        ),
    ),
    ArchCase(
        "gpt-oss (native fused experts)",
        _config(
            "GptOssConfig",
            **_text(head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
        ),
    ),
    ArchCase("granite-moe (parallel experts)", _config("GraniteMoeConfig", **_text(num_local_experts=4, num_experts_per_tok=2))),
    ArchCase(
        "llama4 text (MoE)",
        _config("Llama4TextConfig", **_text(head_dim=16, intermediate_size_mlp=96, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1)),
        outputs_xfail="transformers cannot reload its own 4-bit Llama4 save: loading swaps in per-expert Linear4bit modules "
        "(MODULES_TO_PATCH_FOR_QUANTIZATION) but the save holds fused 3-D experts, so they are initialised on packed uint8 and crash",
    ),
    # Encoders and encoder-decoders.
    ArchCase("bert (encoder, MLM head tied)", BERT, auto="AutoModelForMaskedLM"),
    ArchCase(
        "modernbert (encoder)",
        _config(
            "ModernBertConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        ),
        auto="AutoModelForMaskedLM",
    ),
    ArchCase("t5 fp16 (encoder-decoder, `wo` kept fp32)", T5, auto="AutoModelForSeq2SeqLM", dtype=torch.float16, inputs=seq2seq_inputs),
    ArchCase(
        "bart (encoder-decoder)",
        _config(
            "BartConfig", vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        ),
        auto="AutoModelForSeq2SeqLM",
        inputs=seq2seq_inputs,
    ),
    ArchCase(
        "whisper (audio encoder-decoder)",
        _config(
            "WhisperConfig", vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
            decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[],
        ),
        auto="AutoModelForSpeechSeq2Seq",
        inputs=whisper_inputs,
    ),
    ArchCase(
        "nomic-bert, split Wqkv kept unquantized",
        NOMIC_BERT,
        auto="AutoModel",
        skip_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    # Vision towers.
    ArchCase(
        "vit (vision encoder)",
        _config("ViTConfig", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8),
        auto="AutoModel",
        inputs=vit_inputs,
    ),
    ArchCase(
        "llava (CLIP vision tower)",
        _config(
            "LlavaConfig",
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32),
            text_config=dict(model_type="llama", **_text()),
            image_token_id=120,
            vision_feature_layer=-1,
        ),
        auto="AutoModelForImageTextToText",
        inputs=llava_inputs,
    ),
    ArchCase(
        "qwen2-vl (vision tower)",
        _config(
            "Qwen2VLConfig",
            text_config=dict(**_text(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        ),
        auto="AutoModelForImageTextToText",
        inputs=qwen2_vl_inputs,
    ),
    ArchCase(
        "gemma3 (SigLIP vision tower, tied)",
        _config(
            "Gemma3Config",
            text_config=GEMMA3_TEXT,
            vision_config=SIGLIP,
            mm_tokens_per_image=4, image_token_index=120, boi_token_index=121, eoi_token_index=122,
        ),
        auto="AutoModelForImageTextToText",
        inputs=gemma3_vlm_inputs,
    ),
    ArchCase(
        "paligemma (SigLIP vision tower)",
        _config(
            "PaliGemmaConfig",
            text_config=dict(model_type="gemma", **_text(head_dim=16)),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
            projection_dim=64,
            image_token_index=120,
        ),
        auto="AutoModelForImageTextToText",
        inputs=paligemma_inputs,
    ),
    ArchCase(
        "qwen2.5-vl (windowed vision tower)",
        _config(
            "Qwen2_5_VLConfig",
            text_config=dict(**_text(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))),
            vision_config=dict(
                depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8,
            ),
            image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        ),
        auto="AutoModelForImageTextToText",
        inputs=qwen2_vl_inputs,
    ),
    ArchCase(
        "clip (dual encoder)",
        _config(
            "CLIPConfig",
            text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
            projection_dim=32,
        ),
        auto="AutoModel",
        inputs=clip_inputs,
    ),
    # Checkpoint layouts whose keys are not the model's module names.
    ArchCase("llama saved by LlamaModel", LLAMA, auto="AutoModel", source_class="LlamaModel"),
    ArchCase("llama keys without 'model.'", LLAMA, edit=strip_prefix("model.")),
    ArchCase("qwen2 base checkpoint into ForCausalLM (tied)", _config("Qwen2Config", **_text(tie_word_embeddings=True)), edit=base_model_only("model.")),
    ArchCase("llama with rotary inv_freq buffers", LLAMA, edit=add_rotary_inv_freq),
    ArchCase("gpt2 original layout (no prefix, mask buffers)", GPT2, edit=original_gpt2),
    ArchCase(
        "bloom original layout (no prefix, no lm_head)",
        _config("BloomConfig", vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
        edit=base_model_only("transformer."),
    ),
    ArchCase("bert legacy LayerNorm.gamma/beta, position_ids", BERT, auto="AutoModelForMaskedLM", edit=legacy_bert),
    ArchCase(
        "t5 with tied copies of the embedding",
        T5,
        auto="AutoModelForSeq2SeqLM",
        inputs=seq2seq_inputs,
        edit=tied_copies("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
    ),
    ArchCase("gemma2 tied, only lm_head stored", GEMMA2, edit=only_lm_head),
    ArchCase("gemma2 tied in config, lm_head stored with other values", GEMMA2, edit=distinct_lm_head),
    # Dtypes and options.
    ArchCase("llama mixed bf16/fp32 checkpoint, no config dtype", LLAMA, edit=embeddings_and_norms_in_fp32, drop_config_dtype=True),
    ArchCase("qwen2 fp32 weights, config says bfloat16", _config("Qwen2Config", **_text()), edit=all_fp32),
    ArchCase("llama skip_modules (patterns)", LLAMA, skip_modules=("lm_head", "model.layers.0.mlp", r"model\.layers\.\d+\.self_attn\.o_proj")),
    ArchCase("llama skip_modules (suffix; lm_head quantized)", LLAMA, skip_modules=("down_proj",), dtype=torch.float16),
]


def make_checkpoint(case: ArchCase, path: Path, max_shard_size: str = "40KB", seed: int = 0) -> Path:
    """Save `case`'s random model, sharded, then rewrite its keys and config as the case asks."""
    import transformers
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = case.config()
    if case.source_class is not None:
        model = getattr(transformers, case.source_class)._from_config(config, dtype=case.dtype)
    else:
        model = getattr(transformers, case.auto).from_config(config, dtype=case.dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size, save_original_format=case.original_format)
    if case.edit is not None:
        tensors = case.edit(load_tensors(path))
        for old in path.glob("model*.safetensors*"):
            old.unlink()
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: tensors[k].contiguous() for k in keys}, str(path / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if case.drop_config_dtype:
        data = json.loads((path / "config.json").read_text())
        data.pop("dtype", None)
        (path / "config.json").write_text(json.dumps(data, indent=2))
    return path


def _main_output(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or hidden states / first output), floating inputs cast to the model's dtype."""
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        result = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(result, name, None)
        if value is not None:
            return value
    return result.to_tuple()[0]


@dataclass
class Conversion:
    """One case converted both ways: transformers' in-memory 4-bit model (already saved to `ref`) and streamq's output."""

    case: ArchCase
    src: Path
    ref: Path
    out: Path
    ref_model: Any
    result: Any  # streamq.RequantizeResult

    def checkpoint_differences(self) -> dict[str, list[str]]:
        """Keys only one side wrote, and keys whose dtype, shape or bytes differ; all empty when identical."""
        ours, ref = load_tensors(self.out), load_tensors(self.ref)
        return {
            "only in transformers' save": sorted(set(ref) - set(ours)),
            "only in streamq's output": sorted(set(ours) - set(ref)),
            "different bytes": [k for k in byte_mismatches(ours, ref) if k in ours and k in ref],
        }

    def configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """config.json as streamq wrote it, and as transformers wrote it."""
        return tuple(json.loads((path / "config.json").read_text()) for path in (self.out, self.ref))

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of streamq's checkpoint loaded by the case's Auto class, and of transformers' in-memory model."""
        import transformers

        ours = getattr(transformers, self.case.auto).from_pretrained(self.out)
        return _main_output(ours, self.case.inputs(ours.config)), _main_output(self.ref_model, self.case.inputs(self.ref_model.config))


def convert(case: ArchCase, work: Path) -> Conversion:
    """Build the checkpoint, save transformers' 4-bit reference (before any forward pass), requantize with streamq."""
    import transformers

    from streamq import stream_requantize

    src = make_checkpoint(case, work / "src")
    config = bnb_config()
    if case.skip_modules is not None:
        config.llm_int8_skip_modules = list(case.skip_modules)
    ref_model = getattr(transformers, case.auto).from_pretrained(src, quantization_config=config, device_map="cpu")
    ref_model.save_pretrained(work / "ref")
    result = stream_requantize(src, work / "out", skip_modules=case.skip_modules, progress=False)
    return Conversion(case, src, work / "ref", work / "out", ref_model, result)
