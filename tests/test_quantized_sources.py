"""FP8 and MXFP4 sources: dequantized in the stream, then converted as transformers + bitsandbytes would.

The reference is what a user does with transformers: load the checkpoint dequantized (FineGrainedFP8Config /
CompressedTensorsConfig / Mxfp4Config with dequantize=True), save it, load that with BitsAndBytesConfig and
save again. Where transformers' own dequantization is wrong (FP8 weights whose dimensions are not block
multiples), compressed-tensors' model-free converter (FP8BlockDequantizer) is the reference instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streamq
from quantized_sources import PROJ, make_block_fp8, make_compressed_fp8, make_mxfp4, transformers_dequantized
from streamq import plan_requantize, stream_requantize
from tiny_models import byte_mismatches, load_tensors, logits_of, reference


def _check_against(src: Path, dequantized: Path, tmp_path: Path, quant_type: str = "nf4", double_quant: bool = True) -> None:
    ref_logits = reference(dequantized, tmp_path / "ref", quant_type=quant_type, double_quant=double_quant)
    result = stream_requantize(src, tmp_path / "out", quant_type=quant_type, double_quant=double_quant, progress=False)
    assert result.tensors_quantized > 0
    ours, ref = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "ref")
    assert byte_mismatches(ours, ref) == []
    ours_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ours_cfg == json.loads((tmp_path / "ref" / "config.json").read_text())
    assert ours_cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert torch.equal(logits_of(tmp_path / "out"), ref_logits)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_block_fp8_llama_matches_transformers_dequantized_then_4bit(tmp_path: Path, quant_type, double_quant) -> None:
    from transformers import FineGrainedFP8Config

    src = make_block_fp8(tmp_path / "src", "llama")
    assert len(list(src.glob("*.safetensors"))) > 1
    dequantized = transformers_dequantized(src, tmp_path / "deq", FineGrainedFP8Config(dequantize=True))
    _check_against(src, dequantized, tmp_path, quant_type, double_quant)


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_compressed_tensors_fp8_matches_transformers_dequantized_then_4bit(tmp_path: Path, family: str) -> None:
    from transformers import CompressedTensorsConfig

    src = make_compressed_fp8(tmp_path / "src", family)
    keys = {k for f in src.glob("*.safetensors") for k in load_file(f)}
    assert any(k.endswith(".weight_scale") for k in keys)
    dequantized = transformers_dequantized(src, tmp_path / "deq", CompressedTensorsConfig(dequantize=True))
    _check_against(src, dequantized, tmp_path)


def test_mxfp4_gpt_oss_matches_transformers_dequantized_then_4bit(tmp_path: Path) -> None:
    from transformers import Mxfp4Config

    src = make_mxfp4(tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) > 1
    dequantized = transformers_dequantized(src, tmp_path / "deq", Mxfp4Config(dequantize=True))
    _check_against(src, dequantized, tmp_path)
    experts = [k for k in load_tensors(tmp_path / "out") if k.endswith("experts.gate_up_proj")]
    assert experts  # the experts are dequantized and kept (transformers never quantizes fused experts)


def _ct_dequantized(src: Path, out: Path) -> Path:
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import FP8BlockDequantizer

    convert_checkpoint(src, out, FP8BlockDequantizer.from_pretrained(src), max_workers=1, device="cpu")
    return out


def test_deepseek_v3_fp8_matches_the_block_dequantization_then_4bit(tmp_path: Path) -> None:
    """MoE with MLA; kv_a_proj_with_mqa (144 rows) is not a multiple of the 128 block, as in DeepSeek-V3."""
    src = make_block_fp8(tmp_path / "src", "deepseek")
    assert len(list(src.glob("*.safetensors"))) > 1
    _check_against(src, _ct_dequantized(src, tmp_path / "deq"), tmp_path)


def test_transformers_mis_scales_partial_blocks_so_streamq_follows_compressed_tensors(tmp_path: Path) -> None:
    """transformers 5.25's Fp8Dequantize takes the block from the scale grid: kv_a_proj_with_mqa's 144 rows in
    2 blocks become 2x72, q_b_proj's 192 rows 2x96. Every other tensor of the DeepSeek checkpoint is bit-identical between the two dequantizations."""
    from transformers import FineGrainedFP8Config

    src = make_block_fp8(tmp_path / "src", "deepseek")
    theirs = load_tensors(transformers_dequantized(src, tmp_path / "tf", FineGrainedFP8Config(dequantize=True)))
    ct = load_tensors(_ct_dequantized(src, tmp_path / "ct"))
    partial = {k for k, t in ct.items() if PROJ.search(k) and (t.shape[0] % 128 or t.shape[1] % 128)}
    assert any(k.endswith("kv_a_proj_with_mqa.weight") for k in partial)
    assert set(byte_mismatches(theirs, ct)) == partial
    stream_requantize(src, tmp_path / "out", quant_type="bf16", progress=False)
    assert byte_mismatches(load_tensors(tmp_path / "out"), ct) == []


def test_dry_run_plans_the_dequantized_checkpoint(tmp_path: Path) -> None:
    src = make_block_fp8(tmp_path / "src", "llama")
    plan = plan_requantize(src)
    assert plan.dequantizer is not None and plan.dequantizer.method == "fp8"
    assert all(info.dtype == "BF16" for key, info in plan.tensor_info.items() if key in plan.logical)
    assert not any(key.endswith("weight_scale_inv") for key in plan.tensor_info)
    shard_of = {key: shard.name for shard in plan.shards for key in load_file(src / shard.name)}
    for tensor in plan.logical.values():
        assert len({shard_of[part] for part in tensor.parts}) == 1
    assert "quantization_config" not in plan.config
    from streamq.report import format_plan, plan_summary

    summary = plan_summary(plan, downloads=False)
    assert summary["source_quantization"] == "fp8" and summary["dequantized_tensors"] == len(plan.logical) > 0
    assert "source quantized (fp8)" in format_plan(summary)


def _edit(src: Path, change) -> None:
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: f.name for f in sorted(src.glob("*.safetensors")) for k in load_file(f)}
        index.write_text(json.dumps(data))


def test_fp8_weight_without_its_scale_is_refused_naming_it(tmp_path: Path) -> None:
    src = make_block_fp8(tmp_path / "src", "llama")
    _edit(src, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv", None))
    with pytest.raises(streamq.UnsupportedDtypeError, match=r"model.layers.0.mlp.up_proj.weight is F8_E4M3"):
        stream_requantize(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


def test_scale_in_another_shard_than_its_weight_is_refused(tmp_path: Path) -> None:
    src = make_block_fp8(tmp_path / "src", "llama")
    shards = sorted(src.glob("*.safetensors"))
    first, last = load_file(shards[0]), load_file(shards[-1])
    moved = next(k for k in first if k.endswith("weight_scale_inv"))
    last[moved] = first.pop(moved)
    save_file(first, shards[0], metadata={"format": "pt"})
    save_file(last, shards[-1], metadata={"format": "pt"})
    _edit(src, lambda t: None)
    weight = moved.removesuffix("_scale_inv")
    with pytest.raises(streamq.UnsupportedDtypeError, match=rf"{weight} is F8_E4M3 .*scales are missing from this shard"):
        stream_requantize(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "quantization_config,named,detail",
    [
        ({"quant_method": "gptq", "bits": 4}, "gptq", "streamq dequantizes block FP8"),
        ({"quant_method": "awq", "bits": 4}, "awq", "streamq dequantizes block FP8"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes", "streamq dequantizes block FP8"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}, "fp8", "block-scaled FP8"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors", "float-quantized"),
    ],
)
def test_sources_that_stay_refused_say_what_they_are(tmp_path: Path, quantization_config, named, detail) -> None:
    src = make_block_fp8(tmp_path / "src", "llama")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(streamq.AlreadyQuantizedError, match=rf"already quantized \({named}\).*{detail}.*full-precision"):
        stream_requantize(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("kind", ["block-fp8", "compressed-fp8", "mxfp4"])
def test_bf16_output_is_transformers_dequantized_save(tmp_path: Path, kind: str) -> None:
    from transformers import CompressedTensorsConfig, FineGrainedFP8Config, Mxfp4Config

    make, config = {
        "block-fp8": (lambda p: make_block_fp8(p, "llama"), FineGrainedFP8Config(dequantize=True)),
        "compressed-fp8": (make_compressed_fp8, CompressedTensorsConfig(dequantize=True)),
        "mxfp4": (make_mxfp4, Mxfp4Config(dequantize=True)),
    }[kind]
    src = make(tmp_path / "src")
    ref = transformers_dequantized(src, tmp_path / "ref", config)
    result = stream_requantize(src, tmp_path / "out", quant_type="bf16", progress=False, max_shard_size="300KB")
    assert result.tensors_quantized == 0 and result.shards > 1
    ours = load_tensors(tmp_path / "out")
    assert byte_mismatches(ours, load_tensors(ref)) == []
    assert all(t.dtype == torch.bfloat16 for t in ours.values() if t.is_floating_point())
    ours_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in ours_cfg
    assert ours_cfg == json.loads((ref / "config.json").read_text())
    assert torch.equal(logits_of(tmp_path / "out"), logits_of(src, quantization_config=config, device_map="cpu"))


def test_bf16_output_of_an_unquantized_source_is_refused(tmp_path: Path) -> None:
    from tiny_models import make_model

    src = make_model(tmp_path / "src")
    with pytest.raises(streamq.UnsupportedModelError, match="is not quantized; quant_type bf16"):
        stream_requantize(src, tmp_path / "out", quant_type="bf16", progress=False)


def test_cli_bf16_output_and_verify(tmp_path: Path, capsys) -> None:
    from streamq.cli import main

    src = make_mxfp4(tmp_path / "src")
    assert main(["requantize", str(src), str(tmp_path / "out"), "--quant-type", "bf16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors_quantized"] == 0
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert main(["verify", str(tmp_path / "out")]) == 0


@pytest.mark.slow  # a 170 MB source converted in a subprocess, twice
def test_an_fp8_file_is_dequantized_one_weight_at_a_time(tmp_path: Path) -> None:
    """Peak RSS of a run over what planning alone takes, for a 170 MB block-FP8 file (340 MB once
    dequantized): about one weight's working copies, not the file nor its dequantized form.

    glibc's mmap threshold is fixed: by default glibc raises it (up to 32 MB) as large blocks are freed,
    and then keeps some freed float32 working copies in its arenas, which measures the allocator, not
    what streamq holds."""
    import os

    from transformers import LlamaConfig

    from tiny_models import peak_rss
    from quantized_sources import BLOCK_FP8, _rewrite, _save_random, block_fp8_quantize

    config = LlamaConfig(vocab_size=128, hidden_size=2048, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=64, tie_word_embeddings=False)
    src = tmp_path / "src"
    _save_random(config, src, 0, "50GB")

    def convert(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not key.endswith("_proj.weight"):
            return {key: tensor}
        q, scale = block_fp8_quantize(tensor)
        return {key: q, key.removesuffix("weight") + "weight_scale_inv": scale}

    _rewrite(src, convert, dict(BLOCK_FP8))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    planned = peak_rss("plan", str(src), env=env)
    ran = peak_rss("requantize", str(src), str(tmp_path / "out"), "--no-progress", "--max-shard-size", "200MB", env=env)
    dequantized = 4 * 2 * (4 * 2048 * 2048 + 3 * 2048 * 4096)
    assert ran - planned < 120 * 2**20 < dequantized / 2, (ran, planned)


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_int4_output_from_fp8_equals_int4_from_the_dequantized_checkpoint(tmp_path: Path, family: str) -> None:
    """An FP8 source into int4 (compressed-tensors pack-quantized) gives what the dequantized bf16 checkpoint
    gives; that one's parity with llm-compressor is tests/test_int4.py's."""
    from transformers import FineGrainedFP8Config

    src = make_block_fp8(tmp_path / "src", family)
    if family == "llama":
        dequantized = transformers_dequantized(src, tmp_path / "deq", FineGrainedFP8Config(dequantize=True))
    else:
        dequantized = _ct_dequantized(src, tmp_path / "deq")
    from_fp8 = stream_requantize(src, tmp_path / "a", quant_type="int4", progress=False)
    from_bf16 = stream_requantize(dequantized, tmp_path / "b", quant_type="int4", progress=False)
    assert from_fp8.tensors_quantized == from_bf16.tensors_quantized > 0
    ours, ref = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert any(k.endswith("weight_packed") for k in ours)
    assert byte_mismatches(ours, ref) == []
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads((tmp_path / "b" / "config.json").read_text())


def test_an_interrupted_fp8_run_resumes_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    from tiny_models import fail_on_nth_shard

    src = make_mxfp4(tmp_path / "src")
    options = dict(quant_type="bf16", progress=False, max_shard_size="100KB")
    stream_requantize(src, tmp_path / "clean", **options)
    shards = sorted(p.name for p in (tmp_path / "clean").glob("*.safetensors"))
    assert len(shards) >= 3
    calls = fail_on_nth_shard(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"):
        stream_requantize(src, tmp_path / "out", **options)
    assert not (tmp_path / "out" / "config.json").exists()
    calls.clear()
    result = stream_requantize(src, tmp_path / "out", **options)
    assert calls == shards[1:] and result.shards_skipped == 1
    assert byte_mismatches(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "clean")) == []
