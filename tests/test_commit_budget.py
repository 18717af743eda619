"""The commit budget (commits in any rolling hour, counting the output's own) and the upload journal
that lets a resumed run commit what a killed one uploaded instead of converting it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from streamq import stream_requantize, verify_output
from streamq.commits import HOUR, CommitBudget
from streamq.testing import LocalHub
from tiny_models import OUT_SHARD, header_reads, make_model, work_folder

RUNNER = Path(__file__).with_name("crash_runner.py")


# -- the policy alone ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 100_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_commits_of_the_last_hour_count_and_older_ones_do_not() -> None:
    clock = Clock()
    budget = CommitBudget(10, [clock.now - HOUR - 1, clock.now - 100, clock.now - 50], clock=clock)
    assert budget.left() == 8
    budget.record()
    assert budget.left() == 7
    clock.now += HOUR - 99  # the commit of 100 s ago is now more than an hour old
    assert budget.left() == 8


def test_every_shard_gets_its_own_commit_while_the_budget_allows() -> None:
    budget = CommitBudget(100, clock=Clock())
    assert budget.batch_size(12) == 1


def test_many_shards_are_batched_evenly_with_one_commit_kept_for_the_end() -> None:
    clock = Clock()
    budget = CommitBudget(100, [clock.now - 10], clock=clock)  # the repo's creation
    sizes, uncommitted, pending = [], 161, 0  # 163 shards: the first committed alone, the last with the final files
    while uncommitted:
        pending += 1
        if pending >= budget.batch_size(uncommitted):
            sizes.append(pending)
            uncommitted -= pending
            pending = 0
            budget.record()
    assert sum(sizes) == 161 and max(sizes) - min(sizes) <= 1
    assert budget.left() >= 1  # the final commit still fits


def test_a_spent_budget_blocks_only_the_final_commit_and_waits_for_the_oldest_to_age() -> None:
    clock = Clock()
    budget = CommitBudget(3, [clock.now - 3000, clock.now - 20, clock.now - 10], clock=clock, sleep=clock.sleep)
    assert budget.batch_size(5) is None  # nothing but the final commit may be made
    budget.wait_for_one()
    assert budget.left() == 1 and 600 <= sum(clock.slept) <= 602


def test_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="commits_per_hour"):
        CommitBudget(0)


# -- runs against the emulator ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    src = make_model(root / "src")
    with LocalHub(root / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=src)
        stream_requantize("org/model", "me/clean", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
        clean = files_of(api, "me/clean", root / "clean")
        yield hub, api, len(list(src.glob("*.safetensors"))), clean


def files_of(api: HfApi, repo_id: str, dest: Path) -> dict[str, bytes]:
    """Every file of the repo but the manifest (timestamps), the repo's name normalised in the card."""
    path = Path(snapshot_download(repo_id, endpoint=api.endpoint, local_dir=dest))
    return {
        p.relative_to(path).as_posix(): p.read_bytes().replace(repo_id.encode(), b"<repo>")
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".cache" not in p.parts and p.name != "streamq_manifest.json"
    }


def shards_per_commit(api: HfApi, repo_id: str) -> list[int]:
    """Output shards each commit added, oldest first (the creation commit excluded)."""
    commits = list(reversed(api.list_repo_commits(repo_id)))
    counts = [sum(f.endswith(".safetensors") for f in api.list_repo_files(repo_id, revision=c.commit_id)) for c in commits]
    return [b - a for a, b in zip(counts, counts[1:])]


def test_small_model_commits_every_shard_as_it_is_uploaded(tmp_path: Path, hub_and_model) -> None:
    hub, api, n_shards, clean = hub_and_model
    stream_requantize("org/model", "me/small", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    assert shards_per_commit(api, "me/small") == [1] * n_shards  # the last one with the final files
    assert files_of(api, "me/small", tmp_path / "o") == clean


def test_the_output_repos_own_recent_commits_count_against_the_budget(tmp_path: Path, hub_and_model) -> None:
    hub, api, n_shards, clean = hub_and_model
    api.create_repo("me/busy")  # 1 commit
    for i in range(3):  # 6 more, leaving no file behind (else the output would not be streamq's to write)
        api.upload_file(path_or_fileobj=b"x", path_in_repo=f"f{i}.txt", repo_id="me/busy")
        api.delete_file(f"f{i}.txt", repo_id="me/busy")
    stream_requantize("org/model", "me/busy", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, commits_per_hour=10)
    commits = api.list_repo_commits("me/busy")
    assert len(commits) == 10  # 7 earlier + 3: the first shard, the next ones together, the last with the final files
    assert shards_per_commit(api, "me/busy")[-3:] == [1, n_shards - 2, 1]
    assert files_of(api, "me/busy", tmp_path / "o") == clean


def test_many_shards_are_committed_in_even_batches_within_the_budget(tmp_path: Path, hub_and_model) -> None:
    hub, api, n_shards, clean = hub_and_model
    stream_requantize("org/model", "me/batched", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, commits_per_hour=5)
    assert len(api.list_repo_commits("me/batched")) == 5  # creation, first shard, two batches, final
    assert shards_per_commit(api, "me/batched") == [1, 3, 2, 1]  # 5 between first and last: ceil(5/2), then 2
    assert files_of(api, "me/batched", tmp_path / "o") == clean


# -- a kill between upload and commit -----------------------------------------------------------------------


def run_cli(*args: str, die_at: str | None = None, nth: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), die_at or "before-download", str(nth if die_at else 10**9), "--", *args]
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def killed_between_upload_and_commit(hub: LocalHub, api: HfApi, repo: str, work: Path) -> tuple[tuple[str, ...], set[str]]:
    """A run with a budget of 4 commits (creation, first shard, one batch, final), killed just before its
    batch commit: shards 2-6 are uploaded, journaled and not committed. Returns the CLI arguments and the
    shards the Hub's manifest lists."""
    args = ("requantize", "org/model", repo, "--endpoint", hub.endpoint, "--work-dir", str(work), "--commits-per-hour", "4",
            "--max-shard-size", OUT_SHARD)
    killed = run_cli(*args, die_at="between-upload-and-commit", nth=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = Path(api.hf_hub_download(repo, "streamq_manifest.json", local_dir=work.parent / "m"))
    journal = json.loads((work_folder(work) / "uploaded-not-committed.json").read_text())
    assert len(journal["shards"]) == 5  # shards 2-6 uploaded and journaled
    return args, set(json.loads(manifest.read_text())["shards"])


def source_downloads(hub: LocalHub, api: HfApi) -> float:
    """Bytes of the source's LFS objects streamed, in source files, over the header reads every run makes
    while planning (huggingface_hub's first 100,001 bytes of each file, and streamq's 8-byte read)."""
    sizes = {s.lfs.sha256: s.size for s in api.model_info("org/model", files_metadata=True).siblings if s.lfs}
    headers = header_reads(sizes.values())
    return (sum(hub.requests.sent(oid) for oid in sizes) - headers) / (sum(sizes.values()) / len(sizes))


def test_resume_commits_the_shards_a_killed_run_uploaded(tmp_path: Path, hub_and_model) -> None:
    hub, api, n_shards, clean = hub_and_model
    args, committed = killed_between_upload_and_commit(hub, api, "me/resumed", tmp_path / "work")
    assert len(committed) == 1

    hub.requests.clear()
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["shards_skipped"] == n_shards - 1  # five of them taken up from the journal
    assert source_downloads(hub, api) <= 1  # only the last shard, if the kill came before its download ended
    assert hub.requests.count("PUT", r"^/storage/") <= 1  # the journaled shards are not uploaded again
    assert files_of(api, "me/resumed", tmp_path / "o") == clean
    assert verify_output("me/resumed", endpoint=hub.endpoint).ok


@pytest.mark.slow  # a kill -9 run of the CLI and more (the everyday set keeps test_resume_commits_...)
def test_resume_does_not_trust_a_journal_whose_object_is_gone(tmp_path: Path, hub_and_model) -> None:
    hub, api, n_shards, clean = hub_and_model
    work = tmp_path / "work"
    args, committed = killed_between_upload_and_commit(hub, api, "me/collected", work)
    journal = json.loads((work_folder(work) / "uploaded-not-committed.json").read_text())["shards"]
    lost = sorted(journal)[0]
    hub.drop_object("me/collected", journal[lost]["output_sha256"])  # as a garbage collection of the Hub might

    hub.requests.clear()
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["shards_skipped"] == n_shards - 2  # the lost one was converted again
    # from the lost shard's first byte on: its bytes are checked by a hash of its whole file, resumed at
    # the file's last checkpoint, so the stream runs on from there
    assert 1 <= source_downloads(hub, api) <= n_shards
    assert files_of(api, "me/collected", tmp_path / "o") == clean
    assert verify_output("me/collected", endpoint=hub.endpoint).ok


def test_journal_entries_belong_to_one_job(tmp_path: Path) -> None:
    from streamq.journal import UploadJournal, identity
    from streamq.manifest import Manifest, ShardEntry

    job = Manifest("org/model", "a" * 40, {"quant_type": "nf4"}, "cpu", "1.0")
    entry = ShardEntry("s.safetensors", 5, "2" * 64, 4, ["w"], {"model.safetensors": "1" * 64})
    progress = {"verified": {}, "checkpoints": {"model.safetensors": {"offset": 8, "state": "00"}}}
    journal = UploadJournal(tmp_path / "j.json")
    journal.record(identity("me/out@main", job), "s.safetensors", entry, progress)
    assert journal.entries(identity("me/out@main", job)) == ({"s.safetensors": entry}, progress)
    other = Manifest("org/model", "b" * 40, {"quant_type": "nf4"}, "cpu", "1.0")  # another source revision
    assert journal.entries(identity("me/out@main", other)) == ({}, {})
    assert journal.entries(identity("me/elsewhere@main", job)) == ({}, {})
    (tmp_path / "j.json").write_text("{not json")
    assert journal.entries(identity("me/out@main", job)) == ({}, {})  # unreadable: ignored, never trusted


@pytest.mark.slow  # a kill -9 run of the CLI and more (the everyday set keeps test_resume_commits_...)
def test_overwrite_discards_what_the_journal_took_up(tmp_path: Path, hub_and_model) -> None:
    """Same work_dir and output, other settings, --overwrite: the output starts over, nothing of the
    killed run's uploads is committed into it."""
    hub, api, n_shards, clean = hub_and_model
    work = tmp_path / "work"
    args, _ = killed_between_upload_and_commit(hub, api, "me/other", work)
    done = run_cli(*args, "--quant-type", "fp4", "--overwrite", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["shards_skipped"] == 0
    assert verify_output("me/other", endpoint=hub.endpoint).ok


@pytest.mark.slow  # a kill -9 run of the CLI and more (the everyday set keeps test_resume_commits_...)
def test_a_journaled_object_the_hub_lacks_is_refused_at_commit_even_if_the_check_is_fooled(
    tmp_path: Path, hub_and_model, monkeypatch
) -> None:
    """The Hub itself refuses a commit whose LFS object is missing: even a check that wrongly says the
    object is there (a race with a garbage collection) cannot publish a shard without its bytes."""
    from streamq import StreamqError
    from streamq.publish import HubSink

    hub, api, n_shards, clean = hub_and_model
    work = tmp_path / "work"
    killed_between_upload_and_commit(hub, api, "me/raced", work)
    journal = json.loads((work_folder(work) / "uploaded-not-committed.json").read_text())["shards"]
    hub.drop_object("me/raced", journal[sorted(journal)[0]]["output_sha256"])
    options = dict(endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, work_dir=work, commits_per_hour=4)

    with monkeypatch.context() as patch:
        patch.setattr(HubSink, "_objects_on_hub", lambda self, objects: {sha for sha, _ in objects})
        with pytest.raises(StreamqError, match="refused to commit 5 shard"):
            stream_requantize("org/model", "me/raced", **options)
    assert not (work_folder(work) / "uploaded-not-committed.json").exists()  # never tried again
    result = stream_requantize("org/model", "me/raced", **options)
    assert result.shards_skipped == 1
    assert files_of(api, "me/raced", tmp_path / "o") == clean


def test_a_budget_below_one_is_refused_before_the_output_is_created(hub_and_model) -> None:
    hub, api, _, _ = hub_and_model
    with pytest.raises(ValueError, match="commits_per_hour must be at least 1"):
        stream_requantize("org/model", "me/never", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, commits_per_hour=0)
    assert not api.repo_exists("me/never")
