"""The disk budget: two pools (the read-ahead window, the output shards in flight) that never hold more
than their limits, never deadlock, and let the download run ahead of the conversion as far as allowed."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

import streamq.convert as convert
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


def test_each_pool_waits_for_its_own_room() -> None:
    budget = DiskBudget(window=100, output=50)
    budget.reserve("window", 60)
    budget.reserve("output", 50)
    waiting = blocked(lambda: budget.reserve("window", 60))
    assert waiting.is_alive()  # the window is full; the output pool's room is not lent to it
    budget.release("output", 50)
    assert waiting.is_alive()
    budget.release("window", 60)
    waiting.join(2)
    assert not waiting.is_alive() and budget.used == {"window": 60, "output": 0} and budget.peak == 110


def test_what_is_larger_than_its_pool_is_granted_once_the_pool_is_empty() -> None:
    budget = DiskBudget(window=100, output=50)
    budget.reserve("window", 30)
    waiting = blocked(lambda: budget.reserve("window", 150))
    assert waiting.is_alive()
    budget.release("window", 30)
    waiting.join(2)
    assert not waiting.is_alive() and budget.used["window"] == 150


@pytest.mark.parametrize("seed", range(10))
def test_download_convert_publish_never_deadlock_nor_pass_the_budget(seed: int) -> None:
    """The three threads simulated on random tensor and output sizes: the download reserves segments, the
    converter releases them and reserves outputs, the publisher releases outputs."""
    rng = random.Random(seed)
    segments = [rng.randint(1, 40) for _ in range(40)]
    outputs = [rng.randint(1, 30) for _ in range(8)]
    budget = DiskBudget(window=max(segments) + rng.choice([0, 20, 80]), output=max(a + b for a, b in zip(outputs, outputs[1:])))
    arrived = [threading.Event() for _ in segments]
    published: list[int] = []
    over: list[int] = []

    def download() -> None:
        for i, size in enumerate(segments):
            budget.reserve("window", size)
            arrived[i].set()

    def publish(size: int) -> None:
        time.sleep(rng.random() / 500)
        if budget.used["window"] > budget.limits["window"] or budget.used["output"] > budget.limits["output"]:
            over.append(1)
        budget.release("output", size)
        published.append(size)

    threads = [threading.Thread(target=download, daemon=True)]
    threads[0].start()
    per_output = len(segments) // len(outputs)
    for k, size in enumerate(outputs):
        budget.reserve("output", size)
        for i in range(k * per_output, (k + 1) * per_output if k < len(outputs) - 1 else len(segments)):
            assert arrived[i].wait(5), f"deadlock at segment {i}"
            budget.release("window", segments[i])
        threads.append(threading.Thread(target=publish, args=(size,), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads) and len(published) == len(outputs)
    assert over == [] and budget.peak <= budget.limit


def test_close_wakes_a_waiting_stage() -> None:
    budget = DiskBudget(window=100, output=0)
    budget.reserve("window", 60)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            budget.reserve("window", 60)
        except BaseException as exc:  # noqa: BLE001 (recorded for the assertion)
            errors.append(exc)

    waiting = blocked(wait)
    assert waiting.is_alive()
    budget.close()
    waiting.join(2)
    assert len(errors) == 1 and isinstance(errors[0], BudgetClosed)


@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


def test_the_download_runs_ahead_of_a_slow_conversion_as_far_as_the_budget_allows(tmp_path: Path, hub: LocalHub, monkeypatch) -> None:
    """With the least budget the window holds about one tensor; with a larger one the whole model is
    downloaded while the (slowed) conversion is still at its start. Both give the same bytes."""
    src = make_model(tmp_path / "src", max_shard_size="30KB")
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    api.upload_folder(repo_id="org/model", folder_path=src)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    real = convert._convert_item
    progress: list[tuple[int, int]] = []  # (items converted, source bytes served) at each item

    def slow(*args, **kwargs):
        time.sleep(0.05)
        progress.append((len(progress), hub.requests.sent(r"^/storage/")))
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_convert_item", slow)
    hub.requests.clear()
    stream_requantize("org/model", "me/ahead", endpoint=hub.endpoint, progress=False, max_shard_size="40KB", disk_budget=10**9)
    assert progress[3][1] == hub.requests.sent(r"^/storage/")  # all of it downloaded after three items
    progress.clear()
    hub.requests.clear()
    from streamq import plan_requantize

    plan = plan_requantize("org/model", endpoint=hub.endpoint, max_shard_size="40KB")
    least = plan.largest_tensor() + plan.output_pair()
    stream_requantize("org/model", "me/least", endpoint=hub.endpoint, progress=False, max_shard_size="40KB", disk_budget=least)
    assert progress[3][1] < hub.requests.sent(r"^/storage/") - total / 2  # the download waits for the conversion
    ahead = snapshot_download("me/ahead", local_dir=tmp_path / "a", endpoint=hub.endpoint)
    least_out = snapshot_download("me/least", local_dir=tmp_path / "l", endpoint=hub.endpoint)
    assert byte_mismatches(load_tensors(Path(ahead)), load_tensors(Path(least_out))) == []


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
