"""Hub paths through the loopback emulator, driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

import streamq
from streamq import iter_requantize, stream_requantize, verify_output
from streamq.testing import LocalHub
from tiny_models import OUT_SHARD, byte_mismatches, fail_on_nth_shard, header_reads, load_tensors, logits_of, make_model, reference

@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


def push(hub: LocalHub, src: Path, repo_id: str = "org/model", **kwargs) -> HfApi:
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo(repo_id, **kwargs)
    api.upload_folder(repo_id=repo_id, folder_path=src)
    return api


def download(hub: LocalHub, repo_id: str, dest: Path, revision: str | None = None) -> Path:
    return Path(snapshot_download(repo_id, revision=revision, local_dir=dest, endpoint=hub.endpoint, token="hf_test"))


def source_bytes(hub: LocalHub, src: Path) -> int:
    """Bytes of the source's weight files streamed from storage, over the header reads every run makes
    while planning (huggingface_hub's first 100,001 bytes of each file, and streamq's 8-byte read)."""
    return hub.requests.sent(r"^/storage/") - header_reads(p.stat().st_size for p in src.glob("*.safetensors"))


def test_hub_to_hub_matches_transformers_and_loads(tmp_path: Path, hub: LocalHub) -> None:
    src = make_model(tmp_path / "src")
    ref_logits = reference(src, tmp_path / "ref")
    api = push(hub, src)

    result = stream_requantize("org/model", "me/model-nf4", endpoint=hub.endpoint, token="hf_test", progress=False)

    assert result.source_revision == api.model_info("org/model").sha
    out = download(hub, "me/model-nf4", tmp_path / "out")
    assert byte_mismatches(load_tensors(out), load_tensors(tmp_path / "ref")) == []
    assert torch.equal(logits_of(out), ref_logits)
    assert (out / "nested" / "notes.txt").read_text() == "carried over unchanged\n"
    card = (out / "README.md").read_text()
    assert "base_model: org/model" in card and "base_model_relation: quantized" in card
    assert verify_output("me/model-nf4", endpoint=hub.endpoint, token="hf_test").ok


def test_downloads_read_the_socket_in_pieces_of_1_mib(tmp_path: Path, hub: LocalHub) -> None:
    """httpcore's 64 KiB socket reads cost a 2-core VM a third of a core at 0.5 GB/s; streamq raises them."""
    import huggingface_hub

    http11 = pytest.importorskip("httpcore2._sync.http11" if huggingface_hub.__version__ >= "2" else "httpcore._sync.http11")
    push(hub, make_model(tmp_path / "src"))

    streamq.plan_requantize("org/model", endpoint=hub.endpoint, token="hf_test")

    assert http11.HTTP11Connection.READ_NUM_BYTES == 1 << 20


def test_index_and_config_land_in_the_last_commit(tmp_path: Path, hub: LocalHub) -> None:
    push(hub, make_model(tmp_path / "src"))
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    api = HfApi(endpoint=hub.endpoint)
    commits = api.list_repo_commits("me/out")
    shards = [f for f in api.list_repo_files("me/out") if f.endswith(".safetensors")]
    before_last = set(api.list_repo_files("me/out", revision=commits[1].commit_id))
    assert "config.json" not in before_last and "model.safetensors.index.json" not in before_last
    last = sorted(shards)[-1]
    assert set(shards) - {last} <= before_last  # every shard was committed (with the manifest) before the end,
    assert last not in before_last  # but the last, which lands with the final files: one commit fewer at the end
    assert len(commits) == len(shards) + 1  # repo creation, one per shard but the last, the final one


def test_hub_to_local_and_local_to_hub(tmp_path: Path, hub: LocalHub) -> None:
    src = make_model(tmp_path / "src", "qwen")
    reference(src, tmp_path / "ref")
    push(hub, src)
    stream_requantize("org/model", tmp_path / "local-out", endpoint=hub.endpoint, progress=False)
    stream_requantize(src, "me/from-local", endpoint=hub.endpoint, progress=False)
    ref = load_tensors(tmp_path / "ref")
    assert byte_mismatches(load_tensors(tmp_path / "local-out"), ref) == []
    assert byte_mismatches(load_tensors(download(hub, "me/from-local", tmp_path / "dl")), ref) == []


def test_source_revision_pinned_with_at_sign(tmp_path: Path, hub: LocalHub) -> None:
    api = push(hub, make_model(tmp_path / "src"))
    first = api.model_info("org/model").sha
    api.upload_file(path_or_fileobj=b"changed", path_in_repo="extra.txt", repo_id="org/model")
    result = stream_requantize(f"org/model@{first}", tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert result.source_revision == first and not (tmp_path / "out" / "extra.txt").exists()


def test_resume_after_failure_does_not_download_finished_shards(tmp_path: Path, hub: LocalHub, monkeypatch) -> None:
    src = make_model(tmp_path / "src")
    push(hub, src)
    stream_requantize("org/model", "me/clean", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)

    fail_on_nth_shard(monkeypatch, 4)
    with pytest.raises(OSError, match="injected"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    manifest = HfApi(endpoint=hub.endpoint).hf_hub_download("me/out", "streamq_manifest.json", local_dir=tmp_path / "m")
    committed = json.loads(Path(manifest).read_text())["shards"]
    assert len(committed) >= 2

    hub.requests.clear()
    result = stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    assert result.shards_skipped == len(committed)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert source_bytes(hub, src) < total * 0.75  # finished shards' bytes are not downloaded again
    clean, out = download(hub, "me/clean", tmp_path / "c"), download(hub, "me/out", tmp_path / "o")
    assert byte_mismatches(load_tensors(out), load_tensors(clean)) == []
    for name in ("config.json", "model.safetensors.index.json", "README.md", "tokenizer_config.json"):
        assert (out / name).read_bytes().replace(b"me/out", b"X") == (clean / name).read_bytes().replace(b"me/clean", b"X")


def test_batched_commits_and_uploaded_but_uncommitted_shards(tmp_path: Path, hub: LocalHub, monkeypatch) -> None:
    """With a commit budget smaller than the shards, shards are uploaded at once but committed together; a
    resumed run without the killed run's work_dir does not upload again the bytes it uploaded without committing."""
    src = make_model(tmp_path / "src")
    push(hub, src)
    hub.requests.clear()
    fail_on_nth_shard(monkeypatch, 4)
    with pytest.raises(OSError):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, commits_per_hour=4, max_shard_size=OUT_SHARD)
    api = HfApi(endpoint=hub.endpoint)
    assert len(api.list_repo_commits("me/out")) == 2  # creation + the first shard; the next ones wait for a batch
    uploaded = hub.requests.count("PUT", r"")  # one PUT per shard: 2, or 3 if shard 3's upload had begun
    assert uploaded >= 2

    hub.requests.clear()
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, commits_per_hour=4, max_shard_size=OUT_SHARD)
    uploads = hub.requests.count("PUT", r"")
    n_shards = len(list(src.glob("*.safetensors")))  # as many as the output's at OUT_SHARD
    assert uploads == n_shards - uploaded  # shards uploaded but not committed are on the Hub: not sent again
    assert len(api.list_repo_commits("me/out")) == 2 + 2  # a batch of uploaded shards, then the final commit
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_peak_disk_in_work_dir_stays_within_the_least_budget(tmp_path: Path, hub: LocalHub) -> None:
    """With disk_budget at the least the plan allows (the largest tensor plus two output shards), the work
    dir, sampled in a tight loop, never holds more (but a few kB of config and metadata)."""
    from streamq import plan_requantize

    src = make_model(tmp_path / "src", max_shard_size="30KB")
    push(hub, src)
    plan = plan_requantize("org/model", endpoint=hub.endpoint, max_shard_size=OUT_SHARD)
    least = plan.largest_tensor() + plan.output_pair()
    work = tmp_path / "work"
    sizes: list[int] = []
    stop = threading.Event()

    def used() -> int:
        total = 0
        try:  # the run removes folders as it goes
            for f in work.rglob("*"):
                total += f.stat().st_size if f.is_file() and f.parent.name in ("in", "out") else 0
        except FileNotFoundError:
            pass
        return total

    def sample() -> None:
        while not stop.is_set():
            sizes.append(used())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, work_dir=work, progress=False, max_shard_size=OUT_SHARD, disk_budget=least)
    finally:
        stop.set()
        sampler.join()
    assert 0 < max(sizes) <= least, (max(sizes), least)


def test_concurrent_run_is_refused_and_repo_stays_consistent(tmp_path: Path, hub: LocalHub) -> None:
    """The first run is paused after its first shard (its publish thread may still commit the next one).
    A second run of the same output on this machine is refused at once (the default work folder is
    locked); one from elsewhere (another work_dir) writes the same repo: whichever commits on a head the
    other moved is refused."""
    push(hub, make_model(tmp_path / "src"))
    first = iter_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)
    next(first)
    with pytest.raises(streamq.ConcurrentRunError, match="another streamq run is using the work dir"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)
    refused = []
    for run in (lambda: stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, work_dir=tmp_path / "elsewhere"),
                lambda: list(first)):
        try:
            run()
        except streamq.ConcurrentRunError as exc:
            assert "changed while this run was writing" in str(exc)
            refused.append(exc)
    assert refused  # they did not both write
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)  # resumes
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_rerun_on_finished_hub_repo_is_a_no_op(tmp_path: Path, hub: LocalHub) -> None:
    src = make_model(tmp_path / "src")
    push(hub, src)
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)
    commits = len(HfApi(endpoint=hub.endpoint).list_repo_commits("me/out"))
    hub.requests.clear()
    result = stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)
    assert result.shards_skipped == result.shards
    assert source_bytes(hub, src) == 0 and hub.requests.count("POST", r"/commit/") == 0
    assert len(HfApi(endpoint=hub.endpoint).list_repo_commits("me/out")) == commits


def test_publish_to_a_branch(tmp_path: Path, hub: LocalHub) -> None:
    push(hub, make_model(tmp_path / "src"))
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, branch="nf4")
    api = HfApi(endpoint=hub.endpoint)
    assert "config.json" in api.list_repo_files("me/out", revision="nf4")
    assert "config.json" not in api.list_repo_files("me/out")
    assert verify_output("me/out", branch="nf4", endpoint=hub.endpoint).ok


# --- errors a user can cause on the Hub ---------------------------------------------------------


def test_missing_repo_and_revision(tmp_path: Path, hub: LocalHub) -> None:
    with pytest.raises(streamq.SourceNotFoundError, match="repo org/nope not found"):
        stream_requantize("org/nope", tmp_path / "o", endpoint=hub.endpoint, progress=False)
    push(hub, make_model(tmp_path / "src"))
    with pytest.raises(streamq.SourceNotFoundError, match="revision not found"):
        stream_requantize("org/model@v9", tmp_path / "o", endpoint=hub.endpoint, progress=False)


def test_gated_private_and_read_only(tmp_path: Path) -> None:
    tokens = {"hf_owner": {"write": ["*"]}, "hf_reader": {"read": ["*"], "write": []}}
    with LocalHub(tmp_path / "hub", tokens=tokens) as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_owner")
        src = make_model(tmp_path / "src")
        for repo in ("org/gated", "org/secret"):
            api.create_repo(repo, private=repo == "org/secret")
            api.upload_folder(repo_id=repo, folder_path=src)
        hub.set_gated("org/gated")
        with pytest.raises(streamq.AccessDeniedError, match="gated"):
            stream_requantize("org/gated", tmp_path / "o1", endpoint=hub.endpoint, token="hf_reader", progress=False)
        with pytest.raises(streamq.SourceNotFoundError, match="private"):
            stream_requantize("org/secret", tmp_path / "o2", endpoint=hub.endpoint, token=False, progress=False)
        with pytest.raises(streamq.OutputNotWritableError, match="cannot write to me/out"):
            stream_requantize("org/secret", "me/out", endpoint=hub.endpoint, token="hf_reader", progress=False)
        # the owner's token reads the private repo and writes
        result = stream_requantize("org/secret", "me/out", endpoint=hub.endpoint, token="hf_owner", private=True, progress=False, max_shard_size=OUT_SHARD)
        assert result.shards > 1
        assert HfApi(endpoint=hub.endpoint, token="hf_owner").model_info("me/out").private


def test_create_pr_stages_on_a_branch_and_opens_a_pull_request(tmp_path: Path, hub: LocalHub) -> None:
    push(hub, make_model(tmp_path / "src"))
    result = stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, create_pr=True, max_shard_size=OUT_SHARD)
    api = HfApi(endpoint=hub.endpoint)
    assert result.output.endswith("/discussions/1")  # the pull request's URL, as the Hub reports it
    assert "config.json" not in api.list_repo_files("me/out")  # main is untouched until the PR is merged
    pr_files = set(api.list_repo_files("me/out", revision="refs/pr/1"))
    staged = set(api.list_repo_files("me/out", revision="streamq-4bit"))
    assert {"config.json", "model.safetensors.index.json", "README.md"} <= pr_files
    assert pr_files == staged - {"streamq_manifest.json"}
    assert verify_output("me/out", branch="streamq-4bit", endpoint=hub.endpoint).ok
    rerun = stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, create_pr=True, max_shard_size=OUT_SHARD)
    assert rerun.shards_skipped == rerun.shards
    assert _pr_exists(api, 1) and not _pr_exists(api, 2)  # a finished run opens no second pull request


def _pr_exists(api: HfApi, number: int) -> bool:
    return any(ref.ref == f"refs/pr/{number}" for ref in api.list_repo_refs("me/out", include_pull_requests=True).pull_requests or [])
