"""Broken and hostile safetensors input: a clear error naming the file, nothing published as finished.

Each case runs from a local directory and from the Hub emulator (where headers are read by Range)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import streamq
from streamq import stream_requantize
from streamq.testing import LocalHub
from tiny_models import make_model


def _rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def header_past_eof(p: Path) -> None:
    p.write_bytes(struct.pack("<Q", p.stat().st_size + 1000) + p.read_bytes()[8:])


def huge_header_size(p: Path) -> None:
    p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:])


def header_not_json(p: Path) -> None:
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    p.write_bytes(data[:8] + b"\x00not json" + data[8 + 9 :])
    assert len(p.read_bytes()) == len(data) and n > 9


def overlapping_offsets(p: Path) -> None:
    def change(h: dict) -> None:
        keys = [k for k in h if k != "__metadata__"]
        h[keys[1]]["data_offsets"] = h[keys[0]]["data_offsets"]

    _rewrite_header(p, change)


def offsets_past_data(p: Path) -> None:
    def change(h: dict) -> None:
        key = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        begin, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [begin, end + 4096]

    _rewrite_header(p, change)


def unknown_dtype(p: Path) -> None:
    _rewrite_header(p, lambda h: h[_first_tensor(h)].update(dtype="X99"))


def shape_mismatch(p: Path) -> None:
    _rewrite_header(p, lambda h: h[_first_tensor(h)].update(shape=[3, 5, 7]))


def truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-512])


SHARD_CASES = {
    "header length past end of file": header_past_eof,
    "huge header size": huge_header_size,
    "header not JSON": header_not_json,
    "overlapping tensor offsets": overlapping_offsets,
    "offsets past the data": offsets_past_data,
    "unknown dtype": unknown_dtype,
    "shape does not match byte length": shape_mismatch,
    "truncated file": truncated,
}


def index_missing_tensor(src: Path) -> str:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[3]
    del index["weight_map"][key]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.safetensors.index.json maps it to None"


def index_names_missing_shard(src: Path) -> str:
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    return f"names shard {victim.name}"


def tensor_in_two_shards(src: Path) -> str:
    shards = sorted(src.glob("model-*.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(shards[0], "pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(shards[1], "pt") as f:
        second = {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(first))
    second[key] = first[key]
    save_file(second, str(shards[1]), metadata={"format": "pt"})
    return "also appears in another shard"


INDEX_CASES = {
    "index misses a tensor": index_missing_tensor,
    "index names a missing shard": index_names_missing_shard,
    "a tensor listed in two shards": tensor_in_two_shards,
}


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return make_model(tmp_path / "src")


def _assert_nothing_finished(out: Path) -> None:
    assert not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_broken_shard_from_a_directory(tmp_path: Path, source: Path, case: str) -> None:
    victim = sorted(source.glob("model-*.safetensors"))[1]
    SHARD_CASES[case](victim)
    with pytest.raises((streamq.CorruptShardError, streamq.UnsupportedDtypeError), match=victim.name):
        stream_requantize(source, tmp_path / "out", progress=False)
    _assert_nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_broken_shard_from_the_hub(tmp_path: Path, source: Path, case: str) -> None:
    victim = sorted(source.glob("model-*.safetensors"))[1]
    SHARD_CASES[case](victim)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/bad")
        api.upload_folder(repo_id="org/bad", folder_path=source)
        with pytest.raises((streamq.CorruptShardError, streamq.UnsupportedDtypeError), match=victim.name):
            stream_requantize("org/bad", "me/out", endpoint=hub.endpoint, progress=False)
        assert "config.json" not in api.list_repo_files("me/out") if api.repo_exists("me/out") else True


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_inconsistent_index(tmp_path: Path, source: Path, case: str) -> None:
    expected = INDEX_CASES[case](source)
    with pytest.raises(streamq.CorruptShardError, match=expected):
        stream_requantize(source, tmp_path / "out", progress=False)
    _assert_nothing_finished(tmp_path / "out")


def test_empty_hub_repo(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub") as hub:
        HfApi(endpoint=hub.endpoint).create_repo("org/empty")
        with pytest.raises(streamq.UnsupportedModelError, match="org/empty has no config.json"):
            stream_requantize("org/empty", tmp_path / "out", endpoint=hub.endpoint, progress=False)
