"""Quantizing a shard while it downloads: the reader follows the bytes, starts over when they may have
changed, and refuses bytes that do not match the planned header."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import streamq
from streamq.arrival import Arrival, ArrivalFailed, Restarted
from streamq.convert import convert_arriving
from streamq.fetch import Fetched
from streamq.plan import ShardPlan
from streamq.quantize import quantize_shard, quantize_weight
from streamq.read import ShardReader
from streamq.settings import QuantSettings
from streamq.targets import TensorInfo, TensorRule

SETTINGS = QuantSettings("nf4", True, 64, "bfloat16", None)


def make_shard(path: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layer.{i}.weight": (torch.randn(256, 512, generator=generator) * 0.02 * scale).to(torch.bfloat16) for i in range(4)
    }
    tensors["norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def plan_for(tensors: dict[str, torch.Tensor]) -> SimpleNamespace:
    info = {k: TensorInfo("BF16", tuple(t.shape)) for k, t in tensors.items()}
    return SimpleNamespace(
        settings=SETTINGS,
        tensor_info=info,
        stored_info=info,
        logical={},  # an unquantized source: nothing to dequantize
        rules={k: TensorRule("keep" if k.startswith("norm") else "quantize", k, None, False) for k in tensors},
    )


def expected_output(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"norm.weight": tensors["norm.weight"]}
    for key, tensor in tensors.items():
        if not key.startswith("norm"):
            out.update({f"{key}{suffix}": v for suffix, v in quantize_weight(tensor, SETTINGS, "cpu").items()})
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


class SlowWriter:
    """Writes `source`'s bytes into `dest` in pieces, reporting each to `arrival`: a download whose pace
    the test controls."""

    def __init__(self, source: Path, dest: Path, arrival: Arrival, piece: int = 50_000) -> None:
        self.data, self.dest, self.arrival, self.piece = source.read_bytes(), dest, arrival, piece

    def write(self, start: int, end: int, f) -> None:
        for at in range(start, end, self.piece):
            f.write(self.data[at : min(end, at + self.piece)])
            f.flush()
            self.arrival.advance(f.tell())


def test_tensors_are_read_while_the_rest_of_the_shard_is_still_arriving(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    tensors = make_shard(source)
    reader_got_first = threading.Event()
    arrival = Arrival()
    writer = SlowWriter(source, tmp_path / "in.safetensors", arrival)
    half = len(writer.data) // 2

    def download() -> None:
        with open(writer.dest, "w+b") as f:
            arrival.begin(f.fileno(), 0)
            writer.write(0, half, f)
            if not reader_got_first.wait(30):  # the reader must get a tensor from the first half alone
                arrival.fail()
                return
            writer.write(half, len(writer.data), f)
        arrival.finish()

    thread = threading.Thread(target=download)
    thread.start()
    reader = ShardReader(arrival, "in.safetensors", len(writer.data), plan_for(tensors).tensor_info)
    first = reader.in_file_order(tuple(tensors))[0]
    assert torch.equal(reader.get_tensor(first), tensors[first])
    reader_got_first.set()
    for key in tensors:
        assert torch.equal(reader.get_tensor(key), tensors[key])
    thread.join()
    arrival.close()


def test_a_download_that_starts_over_is_quantized_again_from_the_start(tmp_path: Path) -> None:
    """A server that ignores Range makes the client rewind and rewrite: what was read before is redone."""
    source = tmp_path / "src.safetensors"
    tensors = make_shard(source)
    other = tmp_path / "other.safetensors"
    make_shard(other, scale=3.0)  # same layout, other values: what a first attempt must not leave behind
    arrival = Arrival()
    first_attempt = SlowWriter(other, tmp_path / "in.safetensors", arrival)
    second_attempt = SlowWriter(source, first_attempt.dest, arrival)
    size = len(second_attempt.data)
    reads: list[str] = []
    read_twice = threading.Event()

    def download() -> None:
        with open(first_attempt.dest, "w+b") as f:
            arrival.begin(f.fileno(), 0)
            first_attempt.write(0, size - 1000, f)
            for _ in range(3000):  # until the reader is under way on the first attempt's bytes (30 s at most)
                if len(reads) >= 2:
                    break
                threading.Event().wait(0.01)
            arrival.reset()
            f.seek(0)
            f.truncate()
            second_attempt.write(0, size, f)
        arrival.finish()

    import streamq.read as read_module

    real_entry = read_module.ShardReader._entry  # every tensor read or mapped is looked up here first

    def counting_entry(self, key):
        reads.append(key)
        if len(reads) > len(tensors):
            read_twice.set()
        return real_entry(self, key)

    read_module.ShardReader._entry = counting_entry
    try:
        thread = threading.Thread(target=download)
        thread.start()
        out = quantize_shard(arrival, ShardPlan("in.safetensors", size, None, tuple(tensors)), plan_for(tensors), "cpu")
        thread.join()
    finally:
        read_module.ShardReader._entry = real_entry
        arrival.close()
    assert read_twice.is_set()
    assert_same(out, expected_output(tensors))


def test_a_rewrite_waits_until_no_mapping_is_in_use(tmp_path: Path) -> None:
    """Touching a mapped page of a truncated file kills the process, so `reset` (before a truncate) waits."""
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(range(256)) * 64)
    arrival = arrived(path)
    reset_done = threading.Event()
    generation = arrival.started()
    assert bytes(arrival.read(0, 10, generation)) == bytes(range(10))
    with arrival.mapped(4100, 300, generation) as view:
        assert bytes(view[:3]) == bytes([4100 % 256, 4101 % 256, 4102 % 256]) and len(view) == 300
        assert view.readonly
        with open(path, "r+b") as f:  # the view is the page cache itself, not a copy of it
            f.seek(4100)
            f.write(b"\xff")
        assert view[0] == 0xFF
        resetting = threading.Thread(target=lambda: (arrival.reset(), reset_done.set()))
        resetting.start()
        assert not reset_done.wait(0.3)  # blocked while the mapping is in use
        del view
    assert reset_done.wait(5)
    resetting.join()
    with pytest.raises(Restarted):
        arrival.read(0, 10, generation)  # the old generation is gone
    arrival.close()


def test_a_new_file_is_a_new_generation_a_resumed_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    arrival = Arrival()
    with open(path, "rb") as f:
        arrival.begin(f.fileno(), 60)
        generation = arrival.started()
        assert bytes(arrival.read(0, 50, generation)) == b"x" * 50
        arrival.begin(f.fileno(), 80)  # a retry that resumed the same file further on
        assert arrival.started() == generation
        arrival.begin(f.fileno(), 40)  # shorter than reported: bytes may have changed
        with pytest.raises(Restarted):
            arrival.read(0, 10, generation)
    path.unlink()
    path.write_bytes(b"y" * 100)
    with open(path, "rb") as f:
        arrival.begin(f.fileno(), 100)  # downloaded again into a new file
        with pytest.raises(Restarted):
            arrival.read(0, 10, arrival.started() - 1)
    arrival.close()


def test_header_that_differs_from_the_plan_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    tensors = make_shard(source)
    info = plan_for(tensors).tensor_info
    info["layer.0.weight"] = TensorInfo("BF16", (512, 256))
    arrival = arrived(source)
    with pytest.raises(streamq.CorruptShardError, match=r"model.safetensors: .*tensor layer.0.weight is not the BF16 \[512, 256\]"):
        ShardReader(arrival, source.name, source.stat().st_size, info)
    arrival.close()


def test_file_that_ends_early_is_refused_not_waited_for(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    tensors = make_shard(source)
    size = source.stat().st_size
    with open(source, "r+b") as f:
        f.truncate(size - 100)
    arrival = arrived(source)
    reader = ShardReader(arrival, source.name, size, plan_for(tensors).tensor_info)
    last = reader.in_file_order(tuple(tensors))[-1]
    with pytest.raises(streamq.CorruptShardError, match="model.safetensors: .*ends at byte"):
        reader.get_tensor(last)
    arrival.close()


def test_failed_download_raises_its_own_error_not_the_readers(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    tensors = make_shard(source)
    arrival = Arrival()
    arrival.fail()
    with pytest.raises(ArrivalFailed):
        arrival.started()

    def fetched() -> Fetched:
        raise streamq.CorruptShardError("model.safetensors: downloaded bytes have sha256 x")

    shard = ShardPlan(source.name, source.stat().st_size, None, tuple(tensors))
    with pytest.raises(streamq.CorruptShardError, match="downloaded bytes have sha256"):
        convert_arriving(arrival, fetched, shard, plan_for(tensors), tmp_path, "cpu")


def test_converted_shard_matches_the_file_read_whole(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    tensors = make_shard(source)
    shard = ShardPlan(source.name, source.stat().st_size, None, tuple(tensors))
    converted = convert_arriving(
        arrived(source), lambda: Fetched(source, "0" * 64, temporary=False), shard, plan_for(tensors), tmp_path / "work", "cpu"
    )
    assert_same(load_file(converted.path), expected_output(load_file(source)))
    entry = converted.entry(converted.output_sha256())
    assert entry.input_sha256 == "0" * 64 and source.exists()  # a source read in place is never deleted
    assert entry.output_sha256 == hashlib.sha256(converted.path.read_bytes()).hexdigest()
    assert entry.output_size == converted.path.stat().st_size


def arrived(path: Path) -> Arrival:
    arrival = Arrival()
    arrival.begin_file(path)
    arrival.finish()
    return arrival
