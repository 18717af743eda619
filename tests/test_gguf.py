"""streamq's GGUF output (issue 27) against llama.cpp's own tools on the same checkpoint, byte for byte:
`convert_hf_to_gguf.py --outtype` for bf16/q8_0, that with bf16 then `llama-quantize` for q4_0/q4_k_m, and
`llama-gguf-split --split-max-size` for splits. The reference runs in its own virtualenv (gguf_cases.py);
skipped without $STREAMQ_GGUF_REFERENCE, failed with STREAMQ_REQUIRE_GGUF_REFERENCE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from gguf_cases import (
    gguf_logits, gpt2_vocab_file, make_checkpoint, make_deepseek_fp8_checkpoint, make_gemma3_vision_checkpoint, qwen2_vocab_file,
    reference_or_skip, run_reference,
)
from streamq import stream_requantize
from streamq.cli import main as cli_main
from streamq.testing import LocalHub

SPLIT = "1M"  # llama-gguf-split --split-max-size 1M: 1,000,000 bytes of tensor data per file
SPLIT_BYTES = 1_000_000
FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe")
TYPES = ("q8_0", "q4_0", "q4_k_m", "bf16")


@pytest.fixture(scope="module")
def ref() -> str:
    return reference_or_skip()


@pytest.fixture(scope="module")
def checkpoints(ref: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    made = {}
    for family in FAMILIES:
        vocab = qwen2_vocab_file(ref) if family == "qwen3_moe" else None
        made[family] = make_checkpoint(root / f"tiny-{family}", family, qwen2_vocab=vocab)
    return made


def reference(ref: str, src: Path, out: Path, qtype: str, split: bool) -> list[Path]:
    return run_reference(ref, src, out / f"{src.name}-{qtype}.gguf", qtype, *(["--split-max-size", SPLIT] if split else []))


def gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf"))


def assert_same_files(ours: list[Path], theirs: list[Path]) -> None:
    assert len(ours) == len(theirs), ([p.name for p in ours], [p.name for p in theirs])
    for mine, other in zip(ours, theirs):
        assert mine.read_bytes() == other.read_bytes(), f"{mine.name} differs from llama.cpp's {other.name}"


def split_size(split: bool) -> int:
    return SPLIT_BYTES if split else 10**12


@pytest.mark.parametrize(("family", "qtype", "split"), [
    ("llama", "q8_0", False), ("llama", "q4_k_m", False), ("llama", "q4_k_m", True), ("gemma4_moe", "q4_0", True),
])
def test_bytes_equal_llama_cpp(ref: str, checkpoints: dict[str, Path], tmp_path: Path, family: str, qtype: str, split: bool) -> None:
    src = checkpoints[family]
    theirs = reference(ref, src, tmp_path / "ref", qtype, split)
    out = tmp_path / "out"
    result = stream_requantize(src, out, format="gguf", quant_type=qtype.upper(), max_shard_size=split_size(split), progress=False)
    ours = gguf_files(out)
    assert_same_files(ours, theirs)
    prefix = f"tiny-{family}-{qtype.upper()}"
    if split:
        assert [p.name for p in ours] == [f"{prefix}-{i:05d}-of-{len(ours):05d}.gguf" for i in range(1, len(ours) + 1)] and len(ours) > 1
    else:
        assert [p.name for p in ours] == [f"{prefix}.gguf"]
    assert result.shards == len(ours) and result.bytes_out == sum(p.stat().st_size for p in ours)
    card = (out / "README.md").read_text()
    assert f"ollama run hf.co/{out}:{qtype.upper()}" in card and "llama-cli" in card and "LM Studio" in card


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_type_split_equals_llama_cpp(ref: str, checkpoints: dict[str, Path], tmp_path: Path, family: str, qtype: str) -> None:
    # qwen3_moe's first tensor (a 151,646-row embedding) is larger than 1 MB: llama-gguf-split refuses to start
    # with it ("one of splits have 0 tensors"), where streamq gives it a file of its own; compared unsplit.
    split = family != "qwen3_moe"
    src = checkpoints[family]
    theirs = reference(ref, src, tmp_path / "ref", qtype, split=split)
    stream_requantize(src, tmp_path / "out", format="gguf", quant_type=qtype, max_shard_size=split_size(split), progress=False)
    assert_same_files(gguf_files(tmp_path / "out"), theirs)


@pytest.fixture(scope="module")
def deepseek_fp8(ref: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 as DeepSeek ships it: block FP8 (`weight` F8_E4M3 + `weight_scale_inv`), MLA, MoE with a shared
    expert after a dense layer, an MTP layer the converter drops (gguf_cases.make_deepseek_fp8_checkpoint)."""
    return make_deepseek_fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny-deepseek_v3", gpt2_vocab_file(ref))


@pytest.mark.slow
@pytest.mark.parametrize(("qtype", "split"), [
    ("q8_0", False), ("q8_0", True), ("q4_k_m", False), ("q4_k_m", True), ("bf16", False), ("bf16", True), ("q4_0", True),
])
def test_deepseek_v3_block_fp8_equals_llama_cpp(ref: str, deepseek_fp8: Path, tmp_path: Path, qtype: str, split: bool) -> None:
    """The converter dequantizes the FP8 weights itself (ModelBase.dequant_model: weight x weight_scale_inv,
    repeated over 128 x 128 blocks, partial at the edges), then llama-quantize as for any bf16 source."""
    theirs = reference(ref, deepseek_fp8, tmp_path / "ref", qtype, split)
    stream_requantize(deepseek_fp8, tmp_path / "out", format="gguf", quant_type=qtype, max_shard_size=split_size(split), progress=False)
    ours = gguf_files(tmp_path / "out")
    assert_same_files(ours, theirs)
    assert (len(ours) > 1) == split


@pytest.mark.slow
def test_deepseek_v3_plan_says_the_mtp_layer_is_left_out(deepseek_fp8: Path, capsys) -> None:
    assert cli_main(["plan", str(deepseek_fp8), "--format", "gguf", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # model.layers.3 (the MTP layer): 30 tensors, and the weight_scale_inv of its 21 FP8 weights
    assert summary["warnings"] == ["llama.cpp's converter leaves out 51 source tensor(s), e.g. model.layers.3.eh_proj.weight "
                                   "(51 in multi-token-prediction layers past num_hidden_layers, which it drops)"]
    assert summary["tensor_types"] == {"F32": 17, "Q4_K": 28, "Q5_0": 3, "Q6_K": 3}  # attn_k_b rows are 128: Q4_K falls back


# --- multimodal: the text model and its --mmproj projector (issue 27) -----------------------------------------

@pytest.fixture(scope="module")
def gemma3_vision(ref: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma3ForConditionalGeneration with a SigLIP tower and its projector, as Google ships it (gguf_cases)."""
    return make_gemma3_vision_checkpoint(tmp_path_factory.mktemp("mm") / "tiny-gemma3-vision")


@pytest.mark.parametrize(("qtype", "mmproj_type"), [("q4_k_m", "F16"), pytest.param("q8_0", "Q8_0", marks=pytest.mark.slow)])
def test_multimodal_model_and_its_mmproj_equal_llama_cpps(ref: str, gemma3_vision: Path, tmp_path: Path, qtype: str, mmproj_type: str) -> None:
    """The text model as before, and the projector `convert_hf_to_gguf.py --mmproj` writes (f16 beside a
    llama-quantize type, else the converter's own type), named as it names it by default; both byte for byte
    llama.cpp's, recorded in the manifest, named in the card's run lines; the model loads from its own file."""
    from streamq import verify_output

    mmproj_name = f"mmproj-tiny-gemma3-vision-{mmproj_type}.gguf"
    theirs = run_reference(ref, gemma3_vision, tmp_path / "ref" / f"tiny-gemma3-vision-{qtype}.gguf", qtype,
                           "--mmproj", str(tmp_path / "ref" / mmproj_name))
    out = tmp_path / "out"
    result = stream_requantize(gemma3_vision, out, format="gguf", quant_type=qtype, progress=False)
    model_name = f"tiny-gemma3-vision-{qtype.upper()}.gguf"
    assert [p.name for p in gguf_files(out)] == [mmproj_name, model_name]
    assert_same_files([out / model_name, out / mmproj_name], theirs)
    assert result.shards == 2 and result.bytes_out == sum(p.stat().st_size for p in theirs)
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert sorted(manifest["shards"]) == [mmproj_name, model_name]
    card = (out / "README.md").read_text()
    assert f"llama-mtmd-cli -m {model_name} --mmproj {mmproj_name}" in card and f"`convert_hf_to_gguf.py --mmproj --outtype {mmproj_type.lower()}`" in card
    assert "## Not converted" not in card  # every source tensor is in one file or the other
    report = verify_output(out, load=True)
    assert report.ok and report.loaded and report.checked_files == 2, report.problems


def test_plan_names_the_mmproj_file(ref: str, gemma3_vision: Path, capsys) -> None:
    assert cli_main(["plan", str(gemma3_vision), "--format", "gguf", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mmproj"] == {"name": "mmproj-tiny-gemma3-vision-F16.gguf", "architecture": "clip", "quant_type": "f16",
                                 "tensor_types": {"F16": 13, "F32": 26}}
    assert [o["name"] for o in summary["outputs"]] == ["tiny-gemma3-vision-Q4_K_M.gguf", "mmproj-tiny-gemma3-vision-F16.gguf"]
    assert summary["tensor_types"] == {"F32": 13, "Q4_K": 12, "Q6_K": 3} and summary["warnings"] == []


def test_a_vision_tower_the_converter_has_no_mmproj_for_is_left_out_and_said(ref: str, gemma3_vision: Path, tmp_path: Path, capsys) -> None:
    """Gemma3ForCausalLM (a text architecture, no --mmproj class) over the same checkpoint: the text model only,
    and the plan says which tensors are left out and why."""
    import shutil

    src = tmp_path / "tiny-gemma3-causal"
    shutil.copytree(gemma3_vision, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"architectures": ["Gemma3ForCausalLM"]}))
    assert cli_main(["plan", str(src), "--format", "gguf", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mmproj"] is None and [o["name"] for o in summary["outputs"]] == ["tiny-gemma3-causal-Q4_K_M.gguf"]
    [warning] = summary["warnings"]
    assert warning.startswith("llama.cpp's converter leaves out 39 source tensor(s), e.g. multi_modal_projector.")
    assert warning.endswith("(vision or audio towers: llama.cpp's converter (llama.cpp 0c1e57098) writes no --mmproj projector for Gemma3ForCausalLM)")


@pytest.fixture()
def hub(tmp_path: Path, checkpoints: dict[str, Path]):
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        for family in ("llama", "gemma4_moe"):
            api.create_repo(f"org/tiny-{family}")
            api.upload_folder(repo_id=f"org/tiny-{family}", folder_path=checkpoints[family])
        yield hub


def test_hub_to_hub_split_runs_as_llama_cpps(ref: str, hub: LocalHub, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Hub to Hub, split: each file committed as it is made; the files are llama.cpp's, and llama-cpp-python
    loads the split model from its first file with the reference file's logits, bit for bit."""
    theirs = reference(ref, checkpoints["gemma4_moe"], tmp_path / "ref", "q4_k_m", split=True)
    result = stream_requantize("org/tiny-gemma4_moe", "me/tiny-gemma4_moe-GGUF", format="gguf", endpoint=hub.endpoint,
                               max_shard_size=SPLIT_BYTES, progress=False, commits_per_hour=1000)
    assert result.shards == len(theirs) > 1
    commits = HfApi(endpoint=hub.endpoint).list_repo_commits("me/tiny-gemma4_moe-GGUF")
    assert len(commits) >= len(theirs) + 1  # one per file, then the card
    local = Path(snapshot_download("me/tiny-gemma4_moe-GGUF", endpoint=hub.endpoint, local_dir=tmp_path / "dl"))
    ours = gguf_files(local)
    assert_same_files(ours, theirs)
    assert sorted(p.name for p in local.iterdir() if p.is_file()) == sorted([*(p.name for p in ours), ".gitattributes", "README.md", "streamq_manifest.json"])
    tokens = [1, 300, 301, 302, 303]
    mine, reference_logits = gguf_logits(ref, ours[0], tokens), gguf_logits(ref, theirs[0], tokens)
    assert mine["logits"] == reference_logits["logits"] and len(mine["logits"]) == len(tokens)


def fail_on_nth_file(monkeypatch, n: int) -> None:
    """Raise OSError when the n-th GGUF file is opened (once)."""
    import streamq.gguf.stream as stream

    real, opened = stream.GgufFileWriter, []

    class Failing(real):
        def __init__(self, path: Path, *args, **kwargs) -> None:
            opened.append(path.name)
            if len(opened) == n:
                raise OSError("injected failure")
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(stream, "GgufFileWriter", Failing)


def test_verify_checks_a_gguf_output_and_runs_it_with_llama_cpp(ref: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from streamq import verify_output

    out = tmp_path / "out"
    stream_requantize(checkpoints["llama"], out, format="gguf", quant_type="q4_k_m", max_shard_size=SPLIT_BYTES, progress=False)
    report = verify_output(out, load=True)
    assert report.ok and report.loaded and report.checked_files == len(gguf_files(out)) > 1, report.problems
    last = gguf_files(out)[-1]
    data = bytearray(last.read_bytes())
    data[-100] ^= 1
    last.write_bytes(bytes(data))
    assert any("sha256" in p for p in verify_output(out).problems)


def test_a_failed_run_resumes_without_redoing_published_files(hub: LocalHub, tmp_path: Path, monkeypatch, ref: str, checkpoints: dict[str, Path]) -> None:
    fail_on_nth_file(monkeypatch, 3)
    options = dict(format="gguf", quant_type="q8_0", endpoint=hub.endpoint, max_shard_size=SPLIT_BYTES, progress=False, commits_per_hour=1000)
    with pytest.raises(OSError):
        stream_requantize("org/tiny-llama", "me/out", **options)
    monkeypatch.undo()
    hub.requests.clear()
    result = stream_requantize("org/tiny-llama", "me/out", **options)
    assert result.shards_skipped == 2 and hub.requests.count("PUT") == result.shards - 2
    theirs = reference(ref, checkpoints["llama"], tmp_path / "ref", "q8_0", split=True)
    assert_same_files(gguf_files(Path(snapshot_download("me/out", endpoint=hub.endpoint, local_dir=tmp_path / "dl"))), theirs)


@pytest.mark.parametrize(("args", "said"), [
    (["--blocksize", "32"], "blocksize means nothing for GGUF"),
    (["--compute-dtype", "float16", "--no-double-quant"], "double_quant, compute_dtype mean nothing for GGUF"),
    (["--quant-type", "nf4"], "quant_type for GGUF must be one of llama.cpp's q4_0, q4_k_m"),
])
def test_options_that_mean_nothing_for_gguf_are_refused_by_name(tmp_path: Path, capsys, args: list[str], said: str) -> None:
    code = cli_main(["requantize", str(tmp_path / "no-model"), str(tmp_path / "out"), "--format", "gguf", *args])
    err = capsys.readouterr().err
    assert code == 1 and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_says_the_files_and_types_before_anything_is_written(ref: str, checkpoints: dict[str, Path], capsys) -> None:
    code = cli_main(["plan", str(checkpoints["llama"]), "--format", "gguf", "--max-shard-size", str(SPLIT_BYTES), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["format"] == "gguf" and summary["settings"]["quant_type"] == "q4_k_m"  # the GGUF default
    # llama-quantize's Q4_K_M mixture on 4 layers (tests/test_gguf_reference.py): Q6_K for output and 2 x 2 tensors
    assert summary["tensor_types"] == {"F32": 9, "Q4_K": 25, "Q6_K": 5}
    assert len(summary["outputs"]) > 1 and all(o["name"].endswith(".gguf") for o in summary["outputs"])


# --- QAT: Q4_0 keeps a trained grid (streamq/gguf/qat.py) ---------------------------------------------------

def gguf_tensors(*paths: Path) -> dict[str, tuple[str, "object"]]:
    """name -> (ggml type name, values as f32), read with llama.cpp's own gguf-py."""
    from streamq.gguf.llama_cpp import converter

    _, gguf = converter()
    found = {}
    for path in paths:
        for t in gguf.GGUFReader(path).tensors:
            found[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
    return found


def bf16_bits(values) -> "object":
    import numpy as np

    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma4", "gemma4_moe"])
def test_q4_0_keeps_a_qat_grid_exactly_where_llama_cpp_moves_it(ref: str, tmp_path: Path, family: str) -> None:
    """A Gemma 4 checkpoint trained on a Q4_0 grid (experts included): every weight of every Q4_0 tensor
    dequantizes back to the source (bf16) exactly; llama.cpp's naive Q4_0 keeps fewer; logits are closer to the
    bf16 model's than the naive file's; every other tensor is llama.cpp's, byte for byte."""
    import numpy as np

    src = make_checkpoint(tmp_path / f"tiny-{family}-qat", family, qat_group=32)
    result = stream_requantize(src, tmp_path / "out", format="gguf", quant_type="q4_0", progress=False)
    [ours] = gguf_files(tmp_path / "out")
    [naive] = run_reference(ref, src, tmp_path / "ref" / "naive.gguf", "q4_0")
    [bf16] = run_reference(ref, src, tmp_path / "ref" / "bf16.gguf", "bf16")
    mine, theirs, source = gguf_tensors(ours), gguf_tensors(naive), gguf_tensors(bf16)
    assert list(mine) == list(theirs) and {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in theirs.items()}
    q4 = [n for n, (t, _) in mine.items() if t == "Q4_0"]
    assert any("exps" in n for n in q4) == family.endswith("moe") and len(q4) > 10
    naive_exact = groups = 0
    for name in q4:
        expected = bf16_bits(source[name][1]).reshape(-1, 32)
        assert (bf16_bits(mine[name][1]).reshape(-1, 32) == expected).all(), name
        naive_exact += int((bf16_bits(theirs[name][1]).reshape(-1, 32) == expected).all(axis=1).sum())
        groups += expected.shape[0]
    for name, (kind, values) in mine.items():
        if kind != "Q4_0":
            assert np.array_equal(values, theirs[name][1]), name
    stats = result.stats
    assert stats["q4_0_groups"] == groups and stats["q4_0_groups_exact_as_llama_cpp"] == naive_exact
    assert stats["q4_0_groups_exact_as_llama_cpp"] + stats["q4_0_groups_kept_from_grid"] == groups
    assert naive_exact < groups * 0.95 and stats["q4_0_groups_kept_from_grid"] > groups * 0.05
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{groups} of {groups} Q4_0 groups give back the source weights exactly" in card
    tokens = [1, 300, 301, 302, 303, 304]
    reference_logits = np.array(gguf_logits(ref, bf16, tokens)["logits"])
    ours_off = np.abs(np.array(gguf_logits(ref, ours, tokens)["logits"]) - reference_logits).max()
    naive_off = np.abs(np.array(gguf_logits(ref, naive, tokens)["logits"]) - reference_logits).max()
    assert ours_off < naive_off


@pytest.mark.slow
def test_a_compressed_tensors_int4_source_becomes_q4_0_losslessly(ref: str, tmp_path: Path) -> None:
    """Google's `*-qat-w4a16-ct` kind of source (compressed-tensors pack-quantized int4, groups of 32; made here
    by streamq's own int4 output of a QAT Gemma 4): each Q4_0 block is the source group's scale and codes,
    so every weight equals the source's codes times scales exactly (llama.cpp's --outtype f32 dequantization
    of the same source), where llama.cpp's route (bf16, then llama-quantize Q4_0) moves some of them."""
    import numpy as np
    from safetensors import safe_open

    qat = make_checkpoint(tmp_path / "tiny-gemma4-qat", "gemma4", qat_group=32)
    src = tmp_path / "tiny-gemma4-qat-w4a16-ct"
    made = stream_requantize(qat, src, quant_type="int4", blocksize=32, progress=False)
    assert made.stats["groups_exact"] == made.stats["groups"]  # the int4 source holds the grid exactly
    result = stream_requantize(src, tmp_path / "out", format="gguf", quant_type="q4_0", progress=False)
    assert not any("weight_shape" in w for w in result_warnings(src))
    [ours] = gguf_files(tmp_path / "out")
    [exact] = run_reference(ref, src, tmp_path / "ref" / "f32.gguf", "f32")
    [naive] = run_reference(ref, src, tmp_path / "ref" / "naive.gguf", "q4_0")
    mine, values, theirs = gguf_tensors(ours), gguf_tensors(exact), gguf_tensors(naive)
    q4 = [n for n, (t, _) in mine.items() if t == "Q4_0"]
    assert len(q4) == made.stats["weights"]  # every int4 weight is a Q4_0 tensor
    assert all(np.array_equal(mine[n][1], values[n][1]) for n in q4)
    assert sum(not np.array_equal(theirs[n][1], values[n][1]) for n in q4) > 0  # llama.cpp's own route is not lossless
    assert result.stats["q4_0_groups_exact_as_llama_cpp"] + result.stats["q4_0_groups_kept_from_grid"] == result.stats["q4_0_groups"]
    # the blocks hold the source's own scales: layer 0's q_proj, group by group
    with safe_open(next(src.glob("*.safetensors")), "pt") as f:
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").float().numpy()
    from streamq.gguf.llama_cpp import converter

    _, gguf = converter()
    [blocks] = [t.data for t in gguf.GGUFReader(ours).tensors if t.name == "blk.0.attn_q.weight"]
    d = np.ascontiguousarray(blocks).reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float32).reshape(scales.shape)
    assert np.array_equal(d, scales)


def result_warnings(src: Path) -> list[str]:
    from streamq import plan_requantize

    return plan_requantize(src, format="gguf", quant_type="q4_0").warnings


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_fp32_and_fp16_sources_equal_llama_cpp(ref: str, tmp_path: Path, dtype: str, qtype: str) -> None:
    """llama.cpp's route for them: the converter's own q8_0 from the source's values; llama-quantize from a bf16
    intermediate (tools/quantize/README.md), which streamq's plan uses whatever the source dtype."""
    import torch

    src = make_checkpoint(tmp_path / f"tiny-llama-{dtype}", "llama", dtype=getattr(torch, dtype))
    theirs = reference(ref, src, tmp_path / "ref", qtype, split=True)
    stream_requantize(src, tmp_path / "out", format="gguf", quant_type=qtype, max_shard_size=SPLIT_BYTES, progress=False)
    assert_same_files(gguf_files(tmp_path / "out"), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q5_k_m", "q6_k", "f16", "Q4_K_S"])
def test_the_other_offered_types_equal_llama_cpp(ref: str, checkpoints: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    src = checkpoints["gemma4_moe"]
    theirs = reference(ref, src, tmp_path / "ref", qtype.lower(), split=True)
    stream_requantize(src, tmp_path / "out", format="gguf", quant_type=qtype, max_shard_size=SPLIT_BYTES, progress=False)
    assert_same_files(gguf_files(tmp_path / "out"), theirs)
