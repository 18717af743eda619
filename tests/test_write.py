"""The streaming safetensors writer: files that safetensors and transformers read back bit for bit."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import struct
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamq.write import SafetensorsWriter, WrittenShard, header_reserve, write_shard


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors and torch share, with bit patterns that a lossy path would change."""
    g = torch.Generator().manual_seed(0)
    bits = lambda n: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # noqa: E731
    out = {
        "bf16": bits(2 * 24).view(torch.bfloat16).reshape(4, 6),
        "f16": bits(2 * 6).view(torch.float16),
        "f32.3d": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "fp8_e4m3": bits(33).view(torch.float8_e4m3fn).reshape(3, 11),
        "fp8_e5m2": bits(7).view(torch.float8_e5m2),
        "bool": bits(9).bitwise_and(1).bool().reshape(3, 3),
        "u8": bits(5),
        "i8": bits(5).view(torch.int8),
        "i16": torch.tensor([-(2**15), 0, 2**15 - 1], dtype=torch.int16),
        "i32": torch.tensor([-(2**31), 7], dtype=torch.int32),
        "i64": torch.tensor([[-(2**63), 2**63 - 1]], dtype=torch.int64),
        "u16": bits(4).view(torch.uint16),
        "u32": bits(8).view(torch.uint32),
        "u64": bits(16).view(torch.uint64),
        "scalar.0d": torch.tensor(3.25, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "non_contiguous": torch.randn(4, 5, generator=g).t(),
    }
    if hasattr(torch, "float8_e8m0fnu"):
        out["fp8_e8m0"] = bits(6).view(torch.float8_e8m0fnu)
    return out


def assert_bit_identical(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(_raw(got), _raw(want)), key


def read_header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n]


def write_with(method: str, path: Path, tensors: dict[str, torch.Tensor], tmp: Path, reserve: int | None = None):
    """Write `tensors` through one of the three add methods; add_from_file reads them from the middle of a file."""
    if reserve is None:
        reserve = header_reserve((k, t.dim()) for k, t in tensors.items())
    source = tmp / "source.bin"
    offsets, blob = {}, bytearray(b"junk before")
    for key, t in tensors.items():
        offsets[key] = len(blob)
        blob += _raw(t).numpy().tobytes() + b"\xffgap"
    source.write_bytes(bytes(blob))
    with SafetensorsWriter(path, reserve) as w, open(source, "rb") as src:
        for key, t in tensors.items():
            if method == "add":
                w.add(key, t)
            elif method == "add_chunks":  # uneven pieces, an empty one among them
                flat = t.contiguous().reshape(-1)
                w.add_chunks(key, t.dtype, tuple(t.shape), [flat[:1], flat[1:1], flat[1:4], flat[4:]])
            else:
                w.add_from_file(key, t.dtype, tuple(t.shape), src.fileno(), offsets[key])
        assert w.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        return w.finalize()


METHODS = ["add", "add_chunks", "add_from_file"]


@pytest.mark.parametrize("method", METHODS)
def test_every_dtype_reads_back_bit_identical(tmp_path: Path, method: str) -> None:
    tensors = sample_tensors()
    path = tmp_path / "out" / "model.safetensors"
    path.parent.mkdir()
    written = write_with(method, path, tensors, tmp_path)

    assert written == WrittenShard(path, path.stat().st_size, sum(t.nbytes for t in tensors.values()), sorted(tensors))
    assert os.listdir(path.parent) == ["model.safetensors"]  # no .partial left
    assert_bit_identical(load_file(path), tensors)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert_bit_identical({k: f.get_tensor(k) for k in f.keys()}, tensors)


@pytest.mark.parametrize("method", METHODS)
def test_header_fills_the_reserve_padded_with_spaces(tmp_path: Path, method: str) -> None:
    tensors = sample_tensors()
    reserve = header_reserve((k, t.dim()) for k, t in tensors.items())
    written = write_with(method, tmp_path / "m.safetensors", tensors, tmp_path)

    n, header = read_header(written.path)
    assert n == reserve and reserve % 8 == 0 and header.startswith(b"{")
    text = header.decode()
    assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) > 0  # the spaces are the reserve
    parsed = json.loads(text)
    assert parsed.pop("__metadata__") == {"format": "pt"}
    spans = sorted(tuple(e["data_offsets"]) for e in parsed.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no holes
    assert written.path.stat().st_size == 8 + n + spans[-1][1]
    assert {k: (e["dtype"], e["shape"]) for k, e in parsed.items()}["fp8_e4m3"] == ("F8_E4M3", [3, 11])


def test_dtype_codes_are_safetensors_own(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp_path / "ref.safetensors"))
    written = write_with("add", tmp_path / "ours.safetensors", tensors, tmp_path)
    ours, ref = (json.loads(read_header(p)[1]) for p in (written.path, tmp_path / "ref.safetensors"))
    assert {k: e["dtype"] for k, e in ours.items() if k != "__metadata__"} == {k: e["dtype"] for k, e in ref.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reserve", [0, 16, 64])
def test_too_small_a_reserve_still_gives_a_valid_file(tmp_path: Path, caplog, method: str, reserve: int) -> None:
    tensors = sample_tensors()
    with caplog.at_level(logging.WARNING, logger="streamq.write"):
        written = write_with(method, tmp_path / "m.safetensors", tensors, tmp_path, reserve=reserve)
    assert "were reserved" in caplog.text
    n, header = read_header(written.path)
    assert n > reserve and n % 8 == 0 and header.startswith(b"{")
    assert written.size == written.path.stat().st_size
    assert_bit_identical(load_file(written.path), tensors)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "source.bin"]  # neither .partial nor the second file


def test_header_reserve_bounds_the_largest_header_and_is_not_wasteful() -> None:
    keys = [("model.layers.0.self_attn.q_proj.weight", 2), ("a", 0), ("ü.é", 4), ('q"uote\\', 1)]
    reserve = header_reserve(keys)
    big = 2**64 - 1  # every number at its widest
    worst = {"__metadata__": {"format": "pt"}}
    worst.update({k: {"dtype": "F8_E4M3", "shape": [big] * d, "data_offsets": [big, big]} for k, d in keys})
    worst_len = len(json.dumps(worst, separators=(",", ":"), ensure_ascii=False).encode())
    assert reserve % 8 == 0 and worst_len <= reserve < worst_len + 8  # as tight as the padding allows
    one = header_reserve([("x" * 50, 2)]) - header_reserve([])
    assert 50 + 60 <= one <= 50 + 160
    assert header_reserve([], metadata={"format": "pt", "x": "y" * 100}) > header_reserve([]) + 100


def test_writer_keeps_no_tensor(tmp_path: Path) -> None:
    t = torch.randn(64, 64)
    ref = weakref.ref(t)
    with SafetensorsWriter(tmp_path / "m.safetensors", header_reserve([("w", 2)])) as w:
        w.add("w", t)
        del t
        gc.collect()
        assert ref() is None
        w.finalize()


def test_abort_and_context_manager_leave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    w = SafetensorsWriter(path, 64)
    w.add("a", torch.ones(3))
    assert (tmp_path / "m.safetensors.partial").exists()
    w.abort()
    w.abort()  # idempotent
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="finalized or aborted"):
        w.add("b", torch.ones(1))

    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, 64) as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    with SafetensorsWriter(path, 64) as w:  # left without finalize(): nothing half-written stays either
        w.add("a", torch.ones(3))
    assert os.listdir(tmp_path) == []

    with SafetensorsWriter(path, 64) as w:
        w.add("a", torch.ones(3))
        w.finalize()
    w.abort()  # a finalized file is left alone
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(ValueError, match="finalized or aborted"):
        w.finalize()
    assert torch.equal(load_file(path)["a"], torch.ones(3))


def test_bad_input_is_refused_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, 256) as w:
        w.add("a", torch.arange(4.0))
        with pytest.raises(ValueError, match="duplicate"):
            w.add("a", torch.ones(1))
        with pytest.raises(ValueError, match="reserved"):
            w.add("__metadata__", torch.ones(1))
        with pytest.raises(ValueError, match="needs 24"):  # too few bytes
            w.add_chunks("b", torch.float32, (2, 3), [torch.ones(5)])
        with pytest.raises(ValueError, match="more than"):  # too many: the refused bytes must not stay
            w.add_chunks("b", torch.float32, (2,), [torch.full((50,), 7.0)])
        with pytest.raises(ValueError, match="chunk for a"):
            w.add_chunks("b", torch.float32, (2,), [torch.ones(2, dtype=torch.float16)])
        with pytest.raises(ValueError, match="no dtype code"):
            w.add("c", torch.ones(2, dtype=torch.complex64))
        assert w.data_bytes == 16
        w.add("b", torch.tensor([5.0, 6.0]))
        written = w.finalize()
    assert written.tensor_bytes == 24 and written.keys == ["a", "b"]
    assert_bit_identical(load_file(path), {"a": torch.arange(4.0), "b": torch.tensor([5.0, 6.0])})
    assert written.size == path.stat().st_size == 8 + 256 + 24


@pytest.mark.parametrize("copy_range", ["used", "fails_exdev", "missing"])
def test_add_from_file_copies_the_byte_range_from_the_middle(tmp_path: Path, monkeypatch, copy_range: str) -> None:
    payload = torch.randint(0, 256, (3 * 5 * 2,), dtype=torch.uint8).view(torch.bfloat16).reshape(3, 5)
    raw = _raw(payload).numpy().tobytes()
    source = tmp_path / "src.bin"
    source.write_bytes(b"A" * 1001 + raw + b"B" * 999)
    if copy_range == "used":  # the bytes go through the kernel, not Python
        monkeypatch.setattr(os, "pread", lambda *a: pytest.fail("pread used although copy_file_range works"))
    elif copy_range == "fails_exdev":
        def exdev(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", exdev)
    else:
        monkeypatch.delattr(os, "copy_file_range")
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, 128) as w, open(source, "rb") as src:
        w.add("before", torch.tensor([1, 2], dtype=torch.int64))
        w.add_from_file("x", torch.bfloat16, (3, 5), src.fileno(), 1001)
        w.add("after", torch.tensor([True]))
        w.finalize()
    got = load_file(path)
    assert torch.equal(_raw(got["x"]), _raw(payload))
    assert got["before"].tolist() == [1, 2] and got["after"].tolist() == [True]

    with SafetensorsWriter(tmp_path / "short.safetensors", 128) as w, open(source, "rb") as src:
        with pytest.raises(ValueError, match="ends 1 bytes before"):  # a truncated source is an error, not zeros
            w.add_from_file("x", torch.bfloat16, (3, 5), src.fileno(), 1001 + 999 + 1)


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path: Path, monkeypatch):
    """A directory where writes fail with ENOSPC: a real 64 kB tmpfs (skipped where mounting is not allowed),
    and writes patched to fail the same way (runs everywhere)."""
    where = tmp_path / "tiny"
    where.mkdir()
    if request.param == "tmpfs":
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        yield where
        subprocess.run(["umount", str(where)], check=True)
        return
    real_pwrite, real_copy = os.pwrite, os.copy_file_range

    def full(real, fd_arg: int):  # fd_arg: which argument is the file written to
        def wrapper(*args):
            if _in(where, args[fd_arg]):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)
        return wrapper

    monkeypatch.setattr(os, "pwrite", full(real_pwrite, 0))
    monkeypatch.setattr(os, "copy_file_range", full(real_copy, 1))
    yield where


def _in(folder: Path, fd: int) -> bool:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(folder)


@pytest.mark.parametrize("method", ["add", "add_chunks", "add_from_file"])
def test_full_disk_raises_enospc_and_leaves_no_partial(tmp_path: Path, full_disk: Path, method: str) -> None:
    big = torch.randn(256, 256)  # 256 kB, more than the tmpfs holds
    source = tmp_path / "big.bin"
    source.write_bytes(_raw(big).numpy().tobytes())
    with pytest.raises(OSError) as info:
        with SafetensorsWriter(full_disk / "m.safetensors", 256) as w, open(source, "rb") as src:
            if method == "add":
                w.add("w", big)
            elif method == "add_chunks":
                w.add_chunks("w", big.dtype, tuple(big.shape), big.reshape(-1).split(4096))
            else:
                w.add_from_file("w", big.dtype, tuple(big.shape), src.fileno(), 0)
            w.finalize()
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC
    assert os.listdir(full_disk) == []


def test_full_disk_at_the_header_leaves_no_partial(tmp_path: Path, monkeypatch) -> None:
    real = os.pwrite

    def header_fails(fd, data, offset):
        if offset == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", header_fails)
    w = SafetensorsWriter(tmp_path / "m.safetensors", 64)  # not even a context manager: finalize cleans up itself
    w.add("a", torch.ones(2))
    with pytest.raises(OSError) as info:
        w.finalize()
    assert info.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_write_shard_is_save_file_byte_for_byte(tmp_path: Path) -> None:
    tensors = {k: t.contiguous() for k, t in sample_tensors().items()}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    written = write_shard(tensors, tmp_path / "out" / "model-00001-of-00002.safetensors")
    assert written.path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert written.size == written.path.stat().st_size and written.keys == sorted(tensors)
    assert written.tensor_bytes == sum(t.nbytes for t in tensors.values())
    assert os.listdir(tmp_path / "out") == ["model-00001-of-00002.safetensors"]


def test_transformers_loads_a_model_written_key_by_key(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()  # float32: a bf16 cast would also cast the rotary buffer, unlike a load
    config.save_pretrained(tmp_path)
    state = model.state_dict()
    with SafetensorsWriter(tmp_path / "model.safetensors", header_reserve((k, t.dim()) for k, t in state.items())) as w:
        for key, tensor in state.items():
            w.add(key, tensor)
        w.finalize()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 16))
    assert_bit_identical(dict(loaded.state_dict()), state)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_write_shard_keeps_a_full_disk_an_oserror_and_names_other_failures(tmp_path: Path, full_disk: Path) -> None:
    with pytest.raises(OSError) as info:
        write_shard({"w": torch.randn(256, 256)}, full_disk / "m.safetensors")
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC  # the caller's disk-full handling sees it
    assert os.listdir(full_disk) == []

    from streamq.errors import StreamqError

    (tmp_path / "x.safetensors.partial").mkdir()  # the partial file can't be made: not a full disk
    with pytest.raises(StreamqError, match="cannot write x.safetensors"):
        write_shard({"w": torch.ones(1)}, tmp_path / "x.safetensors")
