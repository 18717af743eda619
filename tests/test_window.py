"""The window between the download and the converter: segments cut at tensor boundaries, bytes read as
they arrive, deleted behind the reader, never more on disk than the budget's window pool."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from streamq.budget import DiskBudget
from streamq.layout import Position, Stored
from streamq.window import SEGMENT, Window, WindowFailed


def layout(sizes: list[int], header: int = 64) -> tuple[list[Stored], int]:
    """Stored tensors of the given sizes back to back after a header, in one file; and the file size."""
    stored, at = [], header
    for i, size in enumerate(sizes):
        stored.append(Stored(f"t{i}", 0, at, at + size))
        at += size
    return stored, at


def feed(window: Window, data: bytes, start: int = 0, piece: int = 1 << 20) -> threading.Thread:
    def run() -> None:
        try:
            window.begin_file(0)
            for at in range(start, len(data), piece):
                window.write(0, at, memoryview(data)[at:at + piece])
        except Exception as exc:  # noqa: BLE001 - handed to the readers, as the download does
            window.fail(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def test_tensors_read_as_they_arrive_and_segments_deleted_behind(tmp_path: Path) -> None:
    rng = random.Random(0)
    sizes = [rng.randint(1, 3 * SEGMENT // 4) for _ in range(12)] + [SEGMENT + 5]  # the last one larger than a segment
    stored, size = layout(sizes)
    data = os.urandom(size)
    budget = DiskBudget(window=3 * SEGMENT, output=0)
    window = Window(tmp_path / "in", budget, stored, [size], Position(0, 0))
    writer = feed(window, data)
    peak = 0
    for tensor in stored:
        with window.mapped(tensor) as view:
            assert bytes(view) == data[tensor.start:tensor.end]
        assert window.read(tensor) == data[tensor.start:tensor.end]
        window.release(Position(0, tensor.end))
        peak = max(peak, on_disk(tmp_path / "in"))
    writer.join(10)
    assert not writer.is_alive()
    assert budget.peak <= budget.limit and peak <= budget.limit
    assert on_disk(tmp_path / "in") == 0 and budget.used["window"] == 0


def test_the_download_waits_for_room_and_never_passes_the_pool(tmp_path: Path) -> None:
    stored, size = layout([SEGMENT // 2] * 10)
    data = os.urandom(size)
    budget = DiskBudget(window=2 * SEGMENT, output=0)
    window = Window(tmp_path / "in", budget, stored, [size], Position(0, 0))
    writer = feed(window, data)
    with window.mapped(stored[0]):
        pass
    writer.join(0.5)
    assert writer.is_alive(), "the download must wait: nothing was released"
    assert on_disk(tmp_path / "in") <= 2 * SEGMENT
    for tensor in stored:
        window.read(tensor)
        window.release(Position(0, tensor.end))
    writer.join(10)
    assert not writer.is_alive() and budget.peak <= 2 * SEGMENT


def test_bytes_before_the_floor_are_not_kept(tmp_path: Path) -> None:
    """A resumed run downloads from a hash checkpoint before its first tensor: those bytes are hashed only."""
    stored, size = layout([1000] * 8)
    data = os.urandom(size)
    budget = DiskBudget(window=SEGMENT, output=0)
    window = Window(tmp_path / "in", budget, stored, [size], stored[5].position)
    feed(window, data).join(10)
    assert on_disk(tmp_path / "in") == size - stored[5].start
    assert window.read(stored[6]) == data[stored[6].start:stored[6].end]


def test_a_failed_download_wakes_the_reader_with_its_error(tmp_path: Path) -> None:
    stored, size = layout([1000] * 4)
    window = Window(tmp_path / "in", DiskBudget(window=SEGMENT, output=0), stored, [size], Position(0, 0))
    window.begin_file(0)
    window.write(0, 0, memoryview(b"\0" * 1500))
    assert window.read(stored[0])  # in already
    threading.Timer(0.2, window.fail, [ConnectionError("link lost")]).start()
    with pytest.raises(WindowFailed, match="link lost"):
        window.read(stored[2])
