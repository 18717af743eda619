"""int4 (compressed-tensors pack-quantized W4A16) output: byte parity with llm-compressor's
round-to-nearest on ordinary checkpoints, and bit-exact QAT checkpoints once loaded by transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from int4_cases import kept_modules, load_dequantized, logits, make_model, reference_python, run_reference
from streamq import UnsupportedModelError, plan_requantize, stream_requantize
from streamq.manifest import MANIFEST_NAME
from tiny_models import byte_mismatches, load_tensors

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def reference() -> str:
    """The reference virtualenv. CI builds it and sets STREAMQ_REQUIRE_INT4_REFERENCE=1: missing there is a failure."""
    python = reference_python()
    if python is None:
        if os.environ.get("STREAMQ_REQUIRE_INT4_REFERENCE") == "1":
            pytest.fail("the llm-compressor reference virtualenv is missing (set STREAMQ_INT4_REFERENCE or build .ref-venv as .ci/run does)")
        pytest.skip("no llm-compressor reference virtualenv (.ci/run builds one; STREAMQ_INT4_REFERENCE points to its python)")
    return python


# Each case runs llm-compressor in its own virtualenv (~8 s): the everyday command (-m "not slow") keeps a dense
# and an MoE case, CI runs them all.
PARITY = [
    ("llama", "bf16", 32), ("llama", "fp16", 64), ("llama", "fp32", 32), ("qwen2", "bf16", 64), ("qwen3", "bf16", 32),
    ("mistral", "fp16", 32), ("gemma", "bf16", 32), ("mixtral", "bf16", 32), ("qwen2_moe", "bf16", 32), ("gemma4", "bf16", 32),
]
EVERYDAY = {("llama", "bf16", 32), ("mixtral", "bf16", 32)}
PARITY = [case if case in EVERYDAY else pytest.param(*case, marks=pytest.mark.slow) for case in PARITY]


@pytest.mark.parametrize("family,dtype,group", PARITY)
def test_rtn_bytes_and_config_match_llm_compressor(tmp_path: Path, reference: str, family: str, dtype: str, group: int) -> None:
    src = make_model(tmp_path / "src", family, DTYPES[dtype])
    plan = plan_requantize(src, quant_type="int4", blocksize=group)
    run_reference(reference, src, tmp_path / "ref", group, kept_modules(plan))

    result = stream_requantize(src, tmp_path / "out", quant_type="int4", blocksize=group, progress=False)

    ours, ref = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "ref")
    assert any(k.endswith(".weight_packed") for k in ours)
    if family in ("mixtral", "qwen2_moe"):
        assert any(".experts.0." in k and k.endswith("weight_packed") for k in ours)  # experts quantized one by one, as the reference
    assert byte_mismatches(ours, ref) == []
    assert result.stats["groups_exact"] == 0 and result.stats["groups"] > 0  # random weights lie on no grid
    assert _ct_config(tmp_path / "out") == _ct_config(tmp_path / "ref") | {"ignore": ["lm_head"]}


def _ct_config(path: Path) -> dict:
    """quantization_config as compressed-tensors reads it (its own defaults filled in), version aside."""
    from compressed_tensors.quantization import QuantizationConfig

    block = json.loads((path / "config.json").read_text())["quantization_config"]
    assert block.pop("quant_method") == "compressed-tensors"
    block.pop("version"), block.pop("transform_config")
    return QuantizationConfig.model_validate(block).model_dump()


@pytest.mark.parametrize("family", ["llama", "gemma4", "gemma4_moe", "mixtral"])
def test_qat_checkpoint_loads_back_bit_identical(tmp_path: Path, family: str) -> None:
    src = make_model(tmp_path / "src", family, qat_group=32)
    result = stream_requantize(src, tmp_path / "out", quant_type="int4", blocksize=32, progress=False)

    assert result.stats["groups"] > 0 and result.stats["groups_exact"] == result.stats["groups"]
    assert result.stats["weights_exact"] == result.stats["weights"] == result.tensors_quantized
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    loaded = load_dequantized(tmp_path / "out")
    want, got = source.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    differ = [k for k in want if not torch.equal(want[k].view(torch.uint8) if want[k].dtype.is_floating_point else want[k],
                                                 got[k].view(torch.uint8) if got[k].dtype.is_floating_point else got[k])]
    assert differ == []
    assert torch.equal(logits(loaded), logits(source))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert sum(e["stats"].get("groups_exact", 0) for e in manifest["shards"].values()) == result.stats["groups"]
    assert "Quantization-aware-trained (QAT) source: **yes**" in (tmp_path / "out" / "README.md").read_text()


def test_gemma4_moe_fused_experts_stay_unquantized(tmp_path: Path) -> None:
    """transformers stores Gemma 4's experts as 3-D tensors and loads no per-expert int4 weights for them."""
    src = make_model(tmp_path / "src", "gemma4_moe")
    plan = plan_requantize(src, quant_type="int4", blocksize=32)
    experts = {k: r.action for k, r in plan.rules.items() if ".experts." in k}
    assert experts and set(experts.values()) == {"keep"}
    assert plan.rules["model.layers.0.self_attn.q_proj.weight"].action == "quantize"
    assert plan.rules["model.layers.0.router.proj.weight"].action == "quantize"  # an nn.Linear: W4A16 targets it


def test_qat_source_at_group_128_is_not_exact_and_card_says_so(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", "llama", qat_group=32)
    result = stream_requantize(src, tmp_path / "out", quant_type="int4", blocksize=64, progress=False)
    assert 0 <= result.stats["groups_exact"] < result.stats["groups"]
    assert "QAT) source: no" in (tmp_path / "out" / "README.md").read_text()


def test_int4_refuses_bitsandbytes_settings_and_bad_group_sizes(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", "llama")
    with pytest.raises(ValueError, match="bitsandbytes settings"):
        stream_requantize(src, tmp_path / "a", quant_type="int4", double_quant=False, progress=False)
    with pytest.raises(ValueError, match="bitsandbytes settings"):
        stream_requantize(src, tmp_path / "a", quant_type="int4", compute_dtype="float16", progress=False)
    with pytest.raises(ValueError, match="32, 64, 128"):
        stream_requantize(src, tmp_path / "a", quant_type="int4", blocksize=256, progress=False)
    with pytest.raises(UnsupportedModelError, match="not a multiple of the int4 group size 128"):
        plan_requantize(src, quant_type="int4")  # hidden size 64, default group 128
    assert not (tmp_path / "a").exists()


def test_cli_int4_resumes_and_verifies(tmp_path: Path, capsys) -> None:
    from streamq.cli import main

    src = make_model(tmp_path / "src", "llama", qat_group=32)
    args = ["requantize", str(src), str(tmp_path / "out"), "--quant-type", "int4", "--blocksize", "32", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stats"]["groups_exact"] == first["stats"]["groups"] > 0
    assert main(args) == 0  # a finished run resumes to nothing, with the same totals from the manifest
    again = json.loads(capsys.readouterr().out)
    assert again["shards_skipped"] == again["shards"] and again["stats"] == first["stats"]
    assert main(["status", str(tmp_path / "out")]) == 0
    assert f"grid-exact groups: {first['stats']['groups']} of {first['stats']['groups']}" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "out"), "--load"]) == 0
    assert main(["requantize", str(src), str(tmp_path / "out"), "--quant-type", "int4", "--blocksize", "64"]) == 1  # other settings
    assert main(["plan", str(src), "--quant-type", "int4", "--blocksize", "32"]) == 0
    assert "grid" in capsys.readouterr().out


def test_exact_groups_are_what_compressed_tensors_round_trip_gives_back() -> None:
    """The grid search's own arithmetic against the library's: a weight mixing grid groups (bf16 and
    fp16, several largest |q|), ordinary groups and all-zero groups, packed, unpacked, compared."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from int4_cases import on_grid

    from streamq.converters import converter_for
    from streamq.settings import QuantSettings

    converter = converter_for(QuantSettings("int4", blocksize=32))
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        grid = on_grid(torch.Size([64, 256]), 32, dtype, generator).reshape(64, 8, 32)
        for rows, top in ((slice(0, 8), 7), (slice(8, 16), 6), (slice(16, 24), 5), (slice(24, 32), 3)):  # largest |q| below 8
            q = torch.randint(-top, top + 1, (8, 8, 32), generator=generator)
            grid[rows] = q.to(dtype) * (torch.rand(8, 8, 1, generator=generator) * 0.02 + 0.002).to(dtype)
        ordinary = (torch.randn(64, 8, 32, generator=generator) * 0.02).to(dtype)
        pick = torch.rand(64, 8, 1, generator=generator) < 0.5
        w = torch.where(pick, grid, ordinary)
        w[0, 0] = 0.0
        w = w.reshape(64, 256)
        scale, exact = converter.scales(w)
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, converter.scheme)
        back = PackedQuantizationCompressor.decompress(packed, converter.scheme)["weight"].to(dtype)
        same = (back.view(torch.int16) == w.view(torch.int16)).reshape(64, 8, 32).all(dim=-1)
        assert torch.equal(same, exact)
        assert bool(exact[pick[..., 0]].all()) and exact[0, 0]
        assert not bool(exact[~pick[..., 0]][1:].any())


def test_hub_to_hub_int4_resumes_after_a_failure(tmp_path: Path, monkeypatch) -> None:
    """Hub source and output, a run that dies on its second shard, then the same call finishing it."""
    from huggingface_hub import HfApi, snapshot_download

    from streamq import verify_output
    from streamq.testing import LocalHub
    from tiny_models import fail_on_nth_shard

    src = make_model(tmp_path / "src", "llama", qat_group=32)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/qat")
        api.upload_folder(repo_id="org/qat", folder_path=src)
        options = dict(quant_type="int4", blocksize=32, endpoint=hub.endpoint, token="hf_test", progress=False, max_shard_size="20KB")
        calls = fail_on_nth_shard(monkeypatch, 2)
        with pytest.raises(OSError, match="injected"):
            stream_requantize("org/qat", "me/qat-int4", **options)
        first_done = calls[0]
        calls.clear()
        result = stream_requantize("org/qat", "me/qat-int4", **options)
        assert first_done not in calls and result.shards_skipped >= 1
        assert result.stats["groups_exact"] == result.stats["groups"] > 0  # resumed shards' counts come from the manifest
        assert verify_output("me/qat-int4", endpoint=hub.endpoint, token="hf_test").ok
        out = Path(snapshot_download("me/qat-int4", local_dir=tmp_path / "out", endpoint=hub.endpoint, token="hf_test"))
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
    assert torch.equal(logits(load_dequantized(out)), logits(source))
    card = (out / "README.md").read_text()
    assert "base_model: org/qat" in card and "compressed-tensors" in card and "vLLM" in card
