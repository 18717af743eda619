"""Transient Hub faults are survived with bounded retries; persistent ones stop with a clear error and a
state the next run resumes from. Faults come from the emulator, the client is the real huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import streamq
import streamq.pipeline
import streamq.retry
from streamq import stream_requantize, verify_output
from streamq.testing import Fault, LocalHub
from tiny_models import OUT_SHARD, header_reads, make_model

SHARD_BYTES = r"^/storage/"  # LFS objects (the shards) are served from storage URLs


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "src")


@pytest.fixture()
def hub(tmp_path: Path, model: Path, monkeypatch):
    monkeypatch.setattr(streamq.retry, "BASE_DELAY", 0.05)  # same schedule, shorter waits
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=model)
        hub.requests.clear()
        yield hub


def run(hub: LocalHub, **kwargs) -> streamq.RequantizeResult:
    return stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, **{"max_shard_size": OUT_SHARD, **kwargs})


TRANSIENT = {
    "repo info 503": lambda: Fault.status(503, method="GET", path=r"^/api/models/org/model", times=2),
    "resolve HEAD 502": lambda: Fault.status(502, method="HEAD", path=r"/resolve/", times=2),
    "header range read 500": lambda: Fault.status(500, method="GET", path=SHARD_BYTES, times=1),
    "download reset mid-body": lambda: Fault.reset(after_bytes=5000, method="GET", path=SHARD_BYTES, times=2),
    "download truncated body": lambda: Fault.truncate(after_bytes=5000, method="GET", path=SHARD_BYTES, times=2),
    "429 with Retry-After": lambda: Fault.rate_limit(retry_after=1, method="GET", path=r"/resolve/", times=1),
    "create repo 503": lambda: Fault.status(503, method="POST", path=r"/api/repos/create", times=1),
    "preupload 503": lambda: Fault.status(503, method="POST", path=r"/preupload/", times=1),
    "LFS batch 503": lambda: Fault.status(503, method="POST", path=r"/info/lfs/objects/batch", times=1),
    "upload reset mid-body": lambda: Fault.reset_upload(after_bytes=3000, method="PUT", times=1),
    "commit fails after LFS upload": lambda: Fault.commit_fails(times=1),
    "commit response lost": lambda: Fault.reset(after_bytes=0, method="POST", path=r"/commit/", times=1),
    "slow server": lambda: Fault.delay(1.5, method="GET", path=SHARD_BYTES, times=1),
    "throttled download": lambda: Fault.throttle(4096, 0.01, method="GET", path=SHARD_BYTES, times=1),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_fault_is_survived(hub: LocalHub, name: str) -> None:
    fault = hub.faults.add(TRANSIENT[name]())
    result = run(hub)
    assert fault.fired >= 1, "the fault must actually have been hit"
    assert result.shards > 1 and verify_output("me/out", endpoint=hub.endpoint).ok


@pytest.fixture()
def big_hub(tmp_path: Path, monkeypatch):
    """Shards of ~15 MB, so that a stream broken after 11 MB has left part of a shard behind."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.setattr(streamq.retry, "BASE_DELAY", 0.05)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "big", max_shard_size="15MB")
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=tmp_path / "big")
        hub.requests.clear()
        yield hub


def test_broken_download_resumes_with_range_instead_of_starting_over(big_hub: LocalHub, monkeypatch) -> None:
    from streamq.fetch import HubSource

    hub = big_hub
    real_stream, armed = HubSource.stream, []

    def stream_with_fault(self, path, sink, end=None):  # arm the fault once planning (header reads) is over
        if not armed:
            armed.append(hub.faults.add(Fault.truncate(after_bytes=11_000_000, method="GET", path=SHARD_BYTES, times=1)))
        return real_stream(self, path, sink, end)

    monkeypatch.setattr(HubSource, "stream", stream_with_fault)
    run(hub, max_shard_size="2MB")
    assert armed[0].fired == 1
    records = list(hub.requests)
    broken = next(i for i, r in enumerate(records) if r.path.startswith("/storage/") and r.status in (200, None))
    resumed = [r for r in records[broken + 1 :] if r.path == records[broken].path]
    assert resumed and resumed[0].status == 206  # a Range request from where the stream broke


def test_a_stream_that_keeps_breaking_goes_on_while_it_moves_forward(big_hub: LocalHub, monkeypatch) -> None:
    """More breaks than retry attempts, each after new bytes: like huggingface_hub's own download loop,
    the count starts again after progress, so the download completes instead of giving up."""
    from streamq.fetch import HubSource

    hub, breaks = big_hub, streamq.retry.ATTEMPTS + 2
    real_stream, armed = HubSource.stream, []

    def stream_with_fault(self, path, sink, end=None):
        if not armed:
            armed.append(hub.faults.add(Fault.truncate(after_bytes=2_000_000, method="GET", path=SHARD_BYTES, times=breaks)))
        return real_stream(self, path, sink, end)

    monkeypatch.setattr(HubSource, "stream", stream_with_fault)
    run(hub, max_shard_size="2MB")
    assert armed[0].fired == breaks
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_persistent_fault_gives_up_clearly_and_next_run_resumes(tmp_path: Path, hub: LocalHub) -> None:
    hub.faults.add(Fault.status(503, method="POST", path=r"/commit/", times=None))
    with pytest.raises(streamq.StreamqError, match=r"publishing to me/out failed: .*503.*run again to resume"):
        run(hub)
    assert hub.requests.count("POST", r"/commit/", status=503) == streamq.retry.ATTEMPTS  # bounded
    hub.faults.clear()
    result = run(hub)
    assert verify_output("me/out", endpoint=hub.endpoint).ok and result.shards_skipped == 0


def test_a_download_that_gives_up_is_resumed_by_the_next_run_inside_its_file(tmp_path: Path, big_hub: LocalHub, monkeypatch) -> None:
    """The stream breaks after 11 MB of a 15 MB file, then storage stays down: the run gives up, having
    published (as pending) the output shards it made, with the file's hash state at the next one's start.
    The next run, even on a fresh work_dir, downloads from there, not from the file's start."""
    from streamq.fetch import HubSource

    hub = big_hub
    real_stream = HubSource.stream

    def stream_with_fault(self, path, sink, end=None):
        hub.faults.add(Fault.truncate(after_bytes=11_000_000, method="GET", path=SHARD_BYTES, times=1))
        hub.faults.add(Fault.status(503, method="GET", path=SHARD_BYTES, times=None))
        return real_stream(self, path, sink, end)

    monkeypatch.setattr(HubSource, "stream", stream_with_fault)
    with pytest.raises(streamq.StreamqError, match="reading org/model failed: .*503.*run again to resume"):
        run(hub, work_dir=tmp_path / "w1", max_shard_size="2MB")
    monkeypatch.setattr(HubSource, "stream", real_stream)
    api = HfApi(endpoint=hub.endpoint)
    manifest = json.loads(Path(api.hf_hub_download("me/out", "streamq_manifest.json", local_dir=tmp_path / "m")).read_text())
    (first, point), = manifest["checkpoints"].items()
    resume_at = point["offset"]
    assert manifest["pending"] and 4_000_000 < resume_at <= 11_000_000
    hub.faults.clear()
    hub.requests.clear()
    result = run(hub, work_dir=tmp_path / "w2", max_shard_size="2MB")
    sizes = {s.rfilename: s.size for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename.endswith(".safetensors")}
    headers = header_reads(sizes.values())
    assert hub.requests.sent(SHARD_BYTES) - headers == sum(sizes.values()) - resume_at  # from the checkpoint on
    assert result.shards_skipped == len(manifest["pending"])
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_checksum_mismatch_is_never_quantized(tmp_path: Path, hub: LocalHub) -> None:
    api = HfApi(endpoint=hub.endpoint)
    index = json.loads(Path(api.hf_hub_download("org/model", "model.safetensors.index.json", local_dir=tmp_path / "i")).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    sha = next(s.lfs.sha256 for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename == victim)
    stored = next(p for p in (tmp_path / "hub").rglob(sha[2:]) if p.is_file())
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes: only the sha256 check can tell
    stored.write_bytes(bytes(data))
    with pytest.raises(streamq.CorruptShardError, match=f"{victim}: the downloaded bytes have sha256 .* never committed, and are dropped"):
        run(hub)
    manifest = json.loads(Path(api.hf_hub_download("me/out", "streamq_manifest.json", local_dir=tmp_path / "m")).read_text())
    made_from = {f for entry in [*manifest["shards"].values(), *manifest["pending"].values()] for f in entry["inputs"]}
    assert victim not in made_from, manifest
    assert victim not in manifest["checkpoints"] and manifest["status"] == "in_progress"
    published = [f for f in api.list_repo_files("me/out") if f.endswith(".safetensors")]
    assert sorted(published) == sorted(manifest["shards"]) and "config.json" not in api.list_repo_files("me/out")
