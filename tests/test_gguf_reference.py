"""The GGUF reference harness (issue 27): llama.cpp's converter, llama-quantize and llama-gguf-split, run in
their own virtualenv (tests/gguf_reference_setup.sh) on a tiny Llama with a trained tokenizer. This checks the
harness, not streamq: the files it writes read back with gguf.GGUFReader, split as llama-gguf-split splits,
and llama-cpp-python loads the split model from its first file and computes the same logits as the single
file. Skipped without $STREAMQ_GGUF_REFERENCE (the venv's python); STREAMQ_REQUIRE_GGUF_REFERENCE=1 fails instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gguf_cases import gguf_logits, make_checkpoint, read_gguf, reference_or_skip, run_reference

SPLIT_TENSORS = 16
TYPES = ("q8_0", "q4_k_m")


@pytest.fixture(scope="module")
def ref() -> str:
    return reference_or_skip()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def outputs(ref: str, llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], list[Path]]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for qtype in TYPES:
        files[qtype, "single"] = run_reference(ref, llama, out / f"single/tiny-llama-{qtype}.gguf", qtype)
        files[qtype, "split"] = run_reference(ref, llama, out / f"split/tiny-llama-{qtype}.gguf", qtype, "--split-max-tensors", str(SPLIT_TENSORS))
    return files


def source_tensors(src: Path) -> list[str]:
    return list(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("qtype", TYPES)
def test_single_file(ref: str, llama: Path, outputs: dict, qtype: str) -> None:
    [path] = outputs[qtype, "single"]
    assert path.name == f"tiny-llama-{qtype}.gguf" and path.is_file()
    [info] = read_gguf(ref, path)
    kv = dict(info["kv"])
    tensors = info["tensors"]
    names = [t["name"] for t in tensors]
    assert len(names) == len(set(names)) == len(source_tensors(llama))  # one GGUF tensor per HF tensor for Llama
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 4
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.chat_template"].startswith("{{ bos_token }}")
    assert not any(k.startswith("split.") for k in kv)
    assert all(t["type"] == "F32" for t in tensors if len(t["shape"]) == 1)
    matrices = {t["name"]: t["type"] for t in tensors if len(t["shape"]) == 2}
    if qtype == "q8_0":
        assert kv["general.file_type"] == 7 and set(matrices.values()) == {"Q8_0"}  # LLAMA_FTYPE_MOSTLY_Q8_0
    else:
        # llama-quantize's Q4_K_M mixture (src/llama-quant.cpp): Q4_K, with Q6_K for output.weight and for
        # attn_v / ffn_down of the layers use_more_bits picks (4 layers: 2 and 3).
        assert kv["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert matrices.pop("output.weight") == "Q6_K"
        more_bits = {f"blk.{i}.{n}.weight" for i in (2, 3) for n in ("attn_v", "ffn_down")}
        assert {n for n, t in matrices.items() if t == "Q6_K"} == more_bits
        assert {t for n, t in matrices.items() if n not in more_bits} == {"Q4_K"}


@pytest.mark.parametrize("qtype", TYPES)
def test_split_is_the_single_file_cut(ref: str, outputs: dict, qtype: str) -> None:
    [single] = read_gguf(ref, *outputs[qtype, "single"])
    paths = outputs[qtype, "split"]
    n = math.ceil(len(single["tensors"]) / SPLIT_TENSORS)
    assert [p.name for p in paths] == [f"tiny-llama-{qtype}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    splits = read_gguf(ref, *paths)
    for i, split in enumerate(splits):
        kv = dict(split["kv"])
        assert (kv["split.no"], kv["split.count"], kv["split.tensors.count"]) == (i, n, len(single["tensors"]))
        assert len(split["tensors"]) == min(SPLIT_TENSORS, len(single["tensors"]) - i * SPLIT_TENSORS)
    strip = lambda t: {k: v for k, v in t.items() if k != "offset"}  # noqa: E731
    assert [strip(t) for s in splits for t in s["tensors"]] == [strip(t) for t in single["tensors"]]
    # The first split carries the model's metadata; llama-gguf-split adds the split keys after it.
    first = [k for k, _ in splits[0]["kv"]]
    assert [k for k in first if not k.startswith("split.")] == [k for k, _ in single["kv"]]


def test_binding_quantizes_as_the_cli(ref: str, llama: Path, outputs: dict, tmp_path: Path) -> None:
    """llama-cpp-python's llama_model_quantize with its default params writes llama-quantize's bytes."""
    [cli] = outputs["q4_k_m", "single"]
    [binding] = run_reference(ref, llama, tmp_path / "binding.gguf", "q4_k_m", "--binding")
    assert binding.read_bytes() == cli.read_bytes()


@pytest.mark.parametrize("qtype", TYPES)
def test_split_model_runs(ref: str, outputs: dict, qtype: str) -> None:
    """llama-cpp-python loads the split model from its first file: the single file's logits, bit for bit."""
    tokens = [1, 300, 301, 302, 303, 304, 305, 2]
    single = gguf_logits(ref, outputs[qtype, "single"][0], tokens)
    split = gguf_logits(ref, outputs[qtype, "split"][0], tokens)
    assert single["n_vocab"] == split["n_vocab"] == len(single["logits"][0])
    assert all(math.isfinite(x) for row in single["logits"] for x in row)
    assert len({round(x, 3) for x in single["logits"][-1]}) > 10  # not a constant row
    assert split["logits"] == single["logits"]


# Every fixture family through the reference at q4_k_m: the converter accepts it, llama-quantize applies its
# mixture, llama-cpp-python loads the result. GGUF architecture and tokenizer model as the converter names them.
FAMILY_GGUF = {
    "llama": ("llama", "llama"), "qwen3": ("qwen3", "llama"), "qwen3_moe": ("qwen3moe", "gpt2"),
    "gemma3": ("gemma3", "llama"), "gemma4": ("gemma4", "gemma4"), "gemma4_moe": ("gemma4", "gemma4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_GGUF)
def test_every_family_converts_quantizes_and_runs(ref: str, family: str, tmp_path: Path) -> None:
    from gguf_cases import qwen2_vocab_file

    vocab = qwen2_vocab_file(ref) if family == "qwen3_moe" else None
    src = make_checkpoint(tmp_path / family, family, qwen2_vocab=vocab)
    [path] = run_reference(ref, src, tmp_path / f"{family}-q4_k_m.gguf", "q4_k_m")
    [info] = read_gguf(ref, path)
    kv = dict(info["kv"])
    assert (kv["general.architecture"], kv["tokenizer.ggml.model"]) == FAMILY_GGUF[family]
    assert kv["general.file_type"] == 15
    types = {t["type"] for t in info["tensors"] if len(t["shape"]) >= 2}
    assert "Q4_K" in types and types <= {"Q4_K", "Q6_K", "F32"}  # rows are multiples of 256: no fallback
    if family.endswith("moe"):
        assert any(len(t["shape"]) == 3 and t["type"] in ("Q4_K", "Q6_K") for t in info["tensors"])  # experts quantized
    tokens = [1, 300, 301, 302] if vocab is None else [9707, 1879, 0]
    out = gguf_logits(ref, path, tokens)
    assert out["n_vocab"] == json.loads((src / "config.json").read_text())["vocab_size"]
    assert all(math.isfinite(x) for row in out["logits"] for x in row)


def test_fixtures_are_deterministic(tmp_path: Path) -> None:
    """Same arguments, same bytes (the parity tests build the checkpoint once per side)."""
    a = make_checkpoint(tmp_path / "a", "gemma4_moe")
    b = make_checkpoint(tmp_path / "b", "gemma4_moe", seed=0)
    c = make_checkpoint(tmp_path / "c", "gemma4_moe", seed=1)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "tokenizer.json" in files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.endswith(".safetensors"))


@pytest.mark.slow
def test_the_converter_dequantizes_deepseek_v3_block_fp8(ref: str, tmp_path: Path) -> None:
    """DeepSeek-V3 in block FP8 (gguf_cases.make_deepseek_fp8_checkpoint) through the reference: the converter
    takes it (GPT-2 tokenizer path, MLA, MoE), multiplies each FP8 weight by its weight_scale_inv block by block
    (ModelBase.dequant_model) and writes no scale, drops the MTP layer; the q4_k_m file loads and runs. The
    fixture is deterministic."""
    import hashlib

    import torch
    from safetensors import safe_open

    from gguf_cases import gpt2_vocab_file, make_deepseek_fp8_checkpoint

    src = make_deepseek_fp8_checkpoint(tmp_path / "tiny-deepseek_v3", gpt2_vocab_file(ref))
    again = make_deepseek_fp8_checkpoint(tmp_path / "again" / "tiny-deepseek_v3", gpt2_vocab_file(ref))
    assert all(p.read_bytes() == (again / p.name).read_bytes() for p in src.iterdir())
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def dequantized(key: str) -> torch.Tensor:
        with safe_open(src / weight_map[key], "pt") as f:
            weight, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
        assert weight.dtype == torch.float8_e4m3fn and scale.shape == tuple(-(-n // 128) for n in weight.shape)
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: weight.shape[0], : weight.shape[1]]
        return weight.float() * full

    def sha(t: torch.Tensor) -> str:
        return hashlib.sha256(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()).hexdigest()

    [bf16] = run_reference(ref, src, tmp_path / "bf16.gguf", "bf16")
    [info] = read_gguf(ref, bf16)
    kv, tensors = dict(info["kv"]), {t["name"]: t for t in info["tensors"]}
    assert (kv["general.architecture"], kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("deepseek2", "gpt2", "gpt-2")
    assert kv["deepseek2.block_count"] == 3 and kv["deepseek2.leading_dense_block_count"] == 1 and kv["deepseek2.expert_shared_count"] == 1
    assert not any("scale" in name or name.startswith("blk.3.") for name in tensors)
    # 320 x 256: the last row block of its scales is partial
    assert tensors["blk.0.attn_kv_a_mqa.weight"]["sha256"] == sha(dequantized("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"))
    experts = torch.stack([dequantized(f"model.layers.2.mlp.experts.{i}.down_proj.weight") for i in range(4)])
    assert tensors["blk.2.ffn_down_exps.weight"]["type"] == "BF16" and tensors["blk.2.ffn_down_exps.weight"]["sha256"] == sha(experts)

    [q4] = run_reference(ref, src, tmp_path / "q4_k_m.gguf", "q4_k_m")
    tokens = [50256, 464, 2068, 7586, 21831]  # <|endoftext|>The quick brown fox
    out = gguf_logits(ref, q4, tokens)
    assert out["n_vocab"] == 50304 and all(math.isfinite(x) for row in out["logits"] for x in row)
