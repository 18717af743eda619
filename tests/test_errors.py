"""Bad input gives a clear StreamqError naming the problem, and publishes nothing that looks finished."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import streamq
from streamq import stream_requantize
from tiny_models import make_model


def _no_finished_output(out: Path) -> bool:
    return not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()


def test_missing_local_source(tmp_path: Path) -> None:
    with pytest.raises(streamq.SourceNotFoundError, match="does not exist"):
        stream_requantize(tmp_path / "nope", tmp_path / "out", progress=False)


def test_a_bare_name_that_is_also_a_local_directory_is_refused(tmp_path: Path, monkeypatch) -> None:
    src = make_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'model' could be a Hub repo id or the local path model.*\./model"):
        stream_requantize("model", "./out", progress=False)
    with pytest.raises(ValueError, match=r"'model' could be a Hub repo id"):
        stream_requantize(src, "model", progress=False)
    assert not (tmp_path / "out").exists()
    stream_requantize("./model", "./out", progress=False)  # as the message says
    assert (tmp_path / "out" / "config.json").exists()


def test_only_pickle_weights_is_refused_without_unpickling(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (src / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    with pytest.raises(streamq.NoSafetensorsError, match=r"no safetensors weights \(found: pytorch_model.bin\)"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_already_quantized_source_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(streamq.AlreadyQuantizedError, match="already quantized \\(gptq\\)"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_quantized_tensors_without_config_are_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", max_shard_size="50GB")
    save_file({"model.layers.0.mlp.up_proj.weight.absmax": torch.zeros(4)}, str(src / "model.safetensors"))
    with pytest.raises(streamq.AlreadyQuantizedError, match="absmax"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(streamq.CorruptShardError, match=shard.name):
        stream_requantize(src, tmp_path / "out", progress=False)
    assert _no_finished_output(tmp_path / "out")


def test_garbage_header_names_the_file(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[0]
    header = b"{not json at all}"
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(streamq.CorruptShardError, match=shard.name):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_unsupported_dtype_names_tensor_and_dtype(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", max_shard_size="50GB")
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(streamq.UnsupportedDtypeError, match=r"model.layers.0.mlp.up_proj.weight has dtype F8_E4M3"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    victim = sorted(src.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(streamq.CorruptShardError, match=f"names shard {victim.name}"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_output_not_writable(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(streamq.OutputNotWritableError, match="cannot write"):
        stream_requantize(src, blocker / "out", progress=False)


def test_output_equal_to_source(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    with pytest.raises(streamq.StreamqError, match="is the source itself"):
        stream_requantize(src, str(src), progress=False)


def test_output_with_foreign_files_is_not_overwritten(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    with pytest.raises(streamq.OutputNotWritableError, match="streamq did not write"):
        stream_requantize(src, out, progress=False)
    assert (out / "something.txt").read_text() == "mine"


def test_custom_code_needs_opt_in(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "modeling_evil.py").write_text("raise SystemExit('source code must not run')\n")
    with pytest.raises(streamq.UnsupportedModelError, match="trust_remote_code"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_cli_prints_one_line_error_and_exit_code(tmp_path: Path, capsys) -> None:
    from streamq.cli import main

    assert main(["requantize", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("streamq: error: source directory") and "does not exist" in err[0]
