"""The disk budget: read-ahead within it, never past it, and never into a deadlock; and the memory a
shard's conversion holds (one window of the input file, not the whole shard)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import save_file

import streamq.convert as convert
import streamq.fetch as fetch
from streamq import stream_requantize
from streamq.budget import BudgetClosed, DiskBudget
from streamq.testing import LocalHub
from tiny_models import byte_mismatches, load_tensors, make_model


def blocked(action, seconds: float = 0.3) -> threading.Thread:
    """Run `action` in a thread; it is still blocked after `seconds` if the thread is alive."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread


def test_next_input_is_read_ahead_when_the_budget_allows() -> None:
    budget = DiskBudget(250)  # two inputs of 100 plus one output of 50
    budget.reserve_input(100, 50)
    budget.reserve_output(50)
    budget.reserve_input(100, 50)  # granted at once: the download overlaps the quantization
    assert budget.used == 250
    third = blocked(lambda: budget.reserve_input(100, 50))
    assert third.is_alive()  # no space left
    budget.release_input(100)  # shard 1 quantized, its input deleted
    third.join(2)
    assert not third.is_alive() and budget.used == 250 and budget.peak == 250


def test_read_ahead_never_takes_the_space_a_pending_output_needs() -> None:
    """Shard 1's input (50) would fit beside shard 0's (50) in a budget of 100, but then shard 0's output
    (50) could never be written and shard 0's input never freed: the read-ahead must wait instead."""
    budget = DiskBudget(100)
    budget.reserve_input(50, 50)
    second = blocked(lambda: budget.reserve_input(50, 10))
    assert second.is_alive()
    budget.reserve_output(50)  # not blocked by the waiting read-ahead
    assert second.is_alive()
    budget.release_input(50)  # shard 0 quantized: now shard 1's input fits beside shard 0's output
    second.join(2)
    assert not second.is_alive() and budget.used == 100


@pytest.mark.parametrize("seed", range(20))
def test_random_shard_sizes_always_finish_within_the_budget(seed: int) -> None:
    """The scheduler's three threads simulated on random sizes and budgets: no deadlock, no overshoot."""
    import random

    rng = random.Random(seed)
    shards = [(rng.randint(1, 100), rng.randint(1, 60)) for _ in range(12)]
    limit = max(i + o for i, o in shards) + rng.choice([0, 0, 30, 100, 250])
    budget = DiskBudget(limit)
    fetched = [threading.Event() for _ in shards]
    overshoot: list[int] = []

    def fetcher() -> None:
        for number, (size_in, size_out) in enumerate(shards):
            budget.reserve_input(size_in, size_out)
            time.sleep(rng.random() / 1000)
            fetched[number].set()

    def publish(size_out: int) -> None:
        time.sleep(rng.random() / 500)
        budget.release_output(size_out)

    def quantizer() -> None:
        for number, (size_in, size_out) in enumerate(shards):
            fetched[number].wait()
            budget.reserve_output(size_out)
            if budget.used > limit:
                overshoot.append(budget.used)
            budget.release_input(size_in)
            threading.Thread(target=publish, args=(size_out,)).start()

    threads = [threading.Thread(target=fetcher, daemon=True), threading.Thread(target=quantizer, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads), f"deadlock with shards {shards} and limit {limit}"
    assert overshoot == [] and budget.peak <= limit


def test_close_wakes_a_waiting_stage() -> None:
    budget = DiskBudget(100)
    budget.reserve_input(60, 40)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            budget.reserve_input(60, 40)
        except BaseException as exc:  # noqa: BLE001 (recorded for the assertion)
            errors.append(exc)

    waiting = blocked(wait)
    assert waiting.is_alive()
    budget.close()
    waiting.join(2)
    assert len(errors) == 1 and isinstance(errors[0], BudgetClosed)


def test_a_shard_larger_than_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="more than the disk budget"):
        DiskBudget(100).reserve_input(80, 30)


@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


def timeline(monkeypatch) -> list[tuple[str, str, float, float]]:
    """(what, shard, start, end) of every download and every quantization, which is slowed down so
    that a download overlapping it cannot be missed."""
    events: list[tuple[str, str, float, float]] = []
    real_fetch, real_quantize = fetch.HubSource.fetch, convert.quantize_shard

    def timed_fetch(self, path, work_dir, arrival=None):
        started = time.monotonic()
        try:
            return real_fetch(self, path, work_dir, arrival)
        finally:
            if path.endswith(".safetensors"):
                events.append(("download", path, started, time.monotonic()))

    def slow_quantize(arrival, shard, *args):
        started = time.monotonic()
        time.sleep(0.3)
        try:
            return real_quantize(arrival, shard, *args)
        finally:
            events.append(("quantize", shard.name, started, time.monotonic()))

    monkeypatch.setattr(fetch.HubSource, "fetch", timed_fetch)
    monkeypatch.setattr(convert, "quantize_shard", slow_quantize)
    return events


def read_ahead(events: list[tuple[str, str, float, float]]) -> int:
    """How many shards started downloading before the previous shard's quantization ended (with the
    default budget, the next download waits for the quantized input to be deleted)."""
    starts = {shard: s for what, shard, s, _ in events if what == "download"}
    ends = sorted((shard, e) for what, shard, _, e in events if what == "quantize")
    return sum(1 for (_, end), (following, _) in zip(ends, ends[1:]) if starts[following] < end)


def test_strict_budget_waits_a_budget_of_two_inputs_reads_ahead(tmp_path: Path, hub: LocalHub, monkeypatch) -> None:
    src = make_model(tmp_path / "src", max_shard_size="30KB")
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    api.upload_folder(repo_id="org/model", folder_path=src)
    shards = sorted(p.stat().st_size for p in src.glob("*.safetensors"))
    assert len(shards) >= 4
    events = timeline(monkeypatch)

    stream_requantize("org/model", "me/strict", endpoint=hub.endpoint, progress=False)
    assert read_ahead(events) == 0  # one input at a time: the next waits for this one to go

    events.clear()
    budget = 3 * (shards[-1] + shards[-1])  # room for the next inputs beside this shard and its output
    stream_requantize("org/model", "me/ahead", endpoint=hub.endpoint, progress=False, disk_budget=budget)
    assert read_ahead(events) == len(shards) - 1

    strict = snapshot_download("me/strict", local_dir=tmp_path / "s", endpoint=hub.endpoint)
    ahead = snapshot_download("me/ahead", local_dir=tmp_path / "a", endpoint=hub.endpoint)
    assert byte_mismatches(load_tensors(Path(ahead)), load_tensors(Path(strict))) == []


RSS_PROBE = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
import torch
from streamq.arrival import Arrival
from streamq.plan import ShardPlan
from streamq.quantize import quantize_shard
from streamq.settings import QuantSettings
from streamq.targets import TensorInfo, TensorRule

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def arrived(path):
    arrival = Arrival()
    arrival.begin_file(path)
    arrival.finish()
    return arrival

path = Path(sys.argv[1])
keys = tuple(json.loads(sys.argv[2]))
info = {k: TensorInfo("BF16", (2048, 4096)) for k in keys}
plan = SimpleNamespace(
    rules={k: TensorRule("quantize", k, None, False) for k in keys},
    tensor_info=info,
    stored_info=info,
    logical={},
    settings=QuantSettings("nf4", True, 64, "bfloat16", None),
)
size = path.stat().st_size
quantize_shard(arrived(path), ShardPlan(path.name, size, None, keys[:1]), plan, "cpu")  # kernel compiled and checked first
before = rss("VmRSS")
out = quantize_shard(arrived(path), ShardPlan(path.name, size, None, keys), plan, "cpu")
print(json.dumps({"growth": rss("VmHWM") - before, "output": sum(t.numel() * t.element_size() for t in out.values())}))
"""


def test_quantizing_a_shard_holds_one_tensor_of_it_not_all_of_it(tmp_path: Path) -> None:
    """Resident memory while a 384 MB shard is quantized grows by its 108 MB output and about one
    16 MB input tensor (with its fp32 working copies), not by the shard."""
    tensors = {f"layer.{i}.weight": torch.full((2048, 4096), 0.01 * (i + 1), dtype=torch.bfloat16) for i in range(24)}
    shard = tmp_path / "model.safetensors"
    save_file(tensors, shard)
    del tensors
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(shard), json.dumps([f"layer.{i}.weight" for i in range(24)])],
        capture_output=True, text=True, check=True,
    )
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    shard_bytes = shard.stat().st_size
    assert measured["output"] < shard_bytes / 3
    assert measured["growth"] < measured["output"] + 128 * 2**20, measured  # output + one tensor + slack
    assert measured["growth"] < shard_bytes / 2, measured


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_warm_up_quantizes_once_per_dtype_the_plan_quantizes(tmp_path: Path, monkeypatch, dtype: torch.dtype) -> None:
    """Kernel loading, its check against bitsandbytes and CUDA start-up happen before the first shard
    is ready: one small weight per quantized dtype, nothing else."""
    import streamq.quantize as quantize
    from streamq.fetch import LocalSource
    from streamq.plan import build_plan
    from streamq.settings import QuantSettings

    src = make_model(tmp_path / "src", dtype=dtype)
    plan = build_plan(LocalSource(src), QuantSettings("nf4", True, 64, "bfloat16", None), tmp_path / "meta")
    seen: list[torch.dtype] = []
    real = quantize.quantize_weight
    monkeypatch.setattr(quantize, "quantize_weight", lambda w, *a: seen.append(w.dtype) or real(w, *a))
    quantize.warm_up(plan, "cpu")
    assert seen == [dtype]
