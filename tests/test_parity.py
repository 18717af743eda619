"""Byte parity with transformers' own 4-bit save, and identical logits once loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamq import stream_requantize
from tiny_models import OUT_SHARD, byte_mismatches, load_tensors, logits_of, make_model, reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Every family from every source dtype; the four quant settings rotate so each family meets several,
# and llama below meets all of them from every dtype.
CASES = [
    (family, dtype, quant_type, double_quant)
    for i, (family, dtype) in enumerate((f, d) for f in ("gemma", "qwen") for d in DTYPES)
    for quant_type, double_quant in [[("nf4", True), ("fp4", False), ("fp4", True), ("nf4", False)][i % 4]]
] + [("llama", dtype, qt, dq) for dtype in DTYPES for qt in ("nf4", "fp4") for dq in (True, False)]


@pytest.mark.parametrize("family,dtype,quant_type,double_quant", CASES)
def test_bytes_config_and_logits_match_transformers(tmp_path: Path, family, dtype, quant_type, double_quant) -> None:
    src = make_model(tmp_path / "src", family, DTYPES[dtype])
    ref_logits = reference(src, tmp_path / "ref", quant_type=quant_type, double_quant=double_quant)

    result = stream_requantize(src, tmp_path / "out", quant_type=quant_type, double_quant=double_quant, progress=False, max_shard_size=OUT_SHARD)

    assert result.shards == len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    ours, ref = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "ref")
    assert byte_mismatches(ours, ref) == []
    assert any(k.endswith(f"quant_state.bitsandbytes__{quant_type}") for k in ours)
    ours_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert ours_cfg["quantization_config"] == ref_cfg["quantization_config"]
    assert ours_cfg == ref_cfg
    assert torch.equal(logits_of(tmp_path / "out"), ref_logits)


def test_tied_embeddings_write_no_lm_head(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", "gemma")
    stream_requantize(src, tmp_path / "out", progress=False)
    keys = set(load_tensors(tmp_path / "out"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert not any(k.startswith("model.embed_tokens.weight.") for k in keys)


def test_index_maps_every_key_with_reference_metadata(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", "llama")
    from tiny_models import bnb_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(), device_map="cpu").save_pretrained(
        tmp_path / "ref", max_shard_size="40KB"
    )
    stream_requantize(src, tmp_path / "out", progress=False, max_shard_size=OUT_SHARD)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    ref_index = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == ref_index["metadata"]
    assert set(index["weight_map"]) == set(ref_index["weight_map"])
    from safetensors import safe_open

    for key, shard in index["weight_map"].items():
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert key in f.keys()


def test_single_file_model_stays_single_file(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", "qwen", max_shard_size="50GB")
    assert (src / "model.safetensors").exists()
    ref_logits = reference(src, tmp_path / "ref")
    stream_requantize(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert byte_mismatches(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "ref")) == []
    assert torch.equal(logits_of(tmp_path / "out"), ref_logits)
