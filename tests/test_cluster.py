"""A run on a Ray cluster (`cluster=`): a local cluster of 3 worker nodes (Ray's own `Cluster`, each node its
own raylet and worker processes) against the Hub emulator. The output must be byte for byte the one-machine
run's; a lost node, a killed driver, a corrupt source file and a node with another streamq must each end as
a run on one machine would; and no tensor bytes may pass through the driver or Ray's object store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from huggingface_hub import HfApi, hf_hub_download
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from ray.cluster_utils import Cluster

import streamq
from streamq import iter_requantize, plan_requantize, stream_requantize, verify_output
from streamq.budget import pools
from streamq.cluster.jobs import job_reads, spans, split_jobs
from streamq.fetch import HubSource
from streamq.testing import Fault, LocalHub
from tiny_models import make_model

TOKEN = "hf_test"
OUT_SHARD = "600KB"  # 7 output shards of the wide test model's 8.9 MB in 5 files
RUNNER = Path(__file__).with_name("crash_runner.py")
RESULTS = ("model.safetensors.index.json", "config.json")  # besides the shards; the card names its repo


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (so no job runs beside the driver) and 3 one-CPU worker nodes."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    with LocalHub(root / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(root / "src", family="llama_wide", max_shard_size="2MB"))
        yield hub


def convert(hub: LocalHub, out: str, **options) -> streamq.RequantizeResult:
    options = {"max_shard_size": OUT_SHARD, **options}
    return stream_requantize("org/model", out, endpoint=hub.endpoint, token=TOKEN, progress=False, **options)


def output_files(hub: LocalHub, repo: str, scratch: Path) -> dict[str, bytes]:
    """The output's shards, index and config, as published."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    names = [n for n in api.list_repo_files(repo) if n.endswith(".safetensors") or n in RESULTS]
    return {n: Path(hf_hub_download(repo, n, local_dir=scratch / repo, endpoint=hub.endpoint, token=TOKEN)).read_bytes() for n in sorted(names)}


@pytest.fixture(scope="module")
def one_machine(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """The one-machine runs the cluster runs must equal, NF4 and int4."""
    scratch = tmp_path_factory.mktemp("one-machine")
    convert(hub, "me/one-nf4")
    convert(hub, "me/one-int4", quant_type="int4")
    return {"nf4": output_files(hub, "me/one-nf4", scratch), "int4": output_files(hub, "me/one-int4", scratch)}


def plasma_bytes_created(cluster: Cluster) -> int:
    """Bytes ever created in the object stores of all nodes (what Ray passes inline in a call is not there)."""
    return get_memory_info_reply(get_state_from_address(cluster.address)).store_stats.cumulative_created_bytes


def test_nf4_on_three_nodes_is_the_one_machine_output_and_no_tensor_bytes_pass_through_the_driver_or_ray(
    tmp_path: Path, hub: LocalHub, cluster: Cluster, one_machine: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def not_here(*args, **kwargs):
        raise AssertionError("the driver moved tensor bytes")

    monkeypatch.setattr(HubSource, "stream", not_here)  # in this process, the driver's, only: the nodes are processes of their own
    monkeypatch.setattr("streamq.publish.upload_shard", not_here)
    caplog.set_level("INFO", logger="streamq.cluster.driver")
    ray.init(address=cluster.address)
    try:
        before = plasma_bytes_created(cluster)
        result = convert(hub, "me/nf4", cluster=cluster.address)
        through_ray = plasma_bytes_created(cluster) - before
    finally:
        ray.shutdown()
    assert output_files(hub, "me/nf4", tmp_path) == one_machine["nf4"]
    assert result.shards == 7 and result.shards_skipped == 0 and verify_output("me/nf4", endpoint=hub.endpoint, token=TOKEN).ok
    # Only the plan went into the object store (13 kB pickled): far less than one quantized weight (131 kB).
    assert through_ray < 64_000, through_ray
    # each job held at most the disk budget a run on one machine has, and every job said so
    plan = plan_requantize("org/model", endpoint=hub.endpoint, token=TOKEN, max_shard_size=OUT_SHARD)
    ends = [r.job_end for r in caplog.records if hasattr(r, "job_end")]
    assert len(ends) == 6 and {e.disk_budget for e in ends} == {sum(pools(plan.largest_tensor(), plan.output_pair(), True))}
    assert all(0 < e.peak_disk <= e.disk_budget for e in ends)
    print(f"object store: {through_ray} bytes created during a run of {result.bytes_in} source bytes")


def test_int4_on_three_nodes_is_the_one_machine_output(tmp_path: Path, hub: LocalHub, cluster: Cluster, one_machine: dict) -> None:
    convert(hub, "me/int4", quant_type="int4", cluster=cluster.address)
    assert output_files(hub, "me/int4", tmp_path) == one_machine["int4"]


def test_the_nodes_thread_count_does_not_change_the_bytes(tmp_path: Path, cluster: Cluster) -> None:
    """NF4's double quant stores the mean of a weight's absmax values, a float32 whose last bits depend on
    how many threads torch sums them on (as in transformers' own save); the nodes here have one CPU, and
    Ray gives a task one thread per CPU, this process two. The jobs use the driver's count."""
    assert torch.get_num_threads() > 1
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src", family="llama_long_mlp", dtype=torch.float32, max_shard_size="10MB"))
        convert(hub, "me/one", max_shard_size="8MB")
        convert(hub, "me/many", max_shard_size="8MB", cluster=cluster.address)
        assert output_files(hub, "me/many", tmp_path) == output_files(hub, "me/one", tmp_path)


@pytest.mark.slow
def test_a_worker_node_lost_mid_run_has_its_job_run_again_elsewhere_and_the_output_is_the_same(
    tmp_path: Path, hub: LocalHub, cluster: Cluster, one_machine: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Downloads held to ~40 kB/s per connection, so every node is inside a job when the first shard is
    published; then one node goes (its raylet and workers killed, as when a VM vanishes)."""
    slow = hub.faults.add(Fault.throttle(4096, 0.1, path="/storage/", times=None))
    worker_nodes = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
    run = iter_requantize("org/model", "me/lost-node", endpoint=hub.endpoint, token=TOKEN, progress=False, max_shard_size=OUT_SHARD, cluster=cluster.address)
    caplog.set_level("INFO", logger="streamq.cluster.driver")
    try:
        first = next(run)
        lost = worker_nodes[0].node_id[:8]
        cluster.remove_node(worker_nodes[0], allow_graceful=False)
        hub.faults.remove(slow)  # connections already open stay slow
        records, result = run_to_end(run)
    finally:
        hub.faults.clear()
        cluster.add_node(num_cpus=1)  # three nodes again for the next tests
        cluster.wait_for_nodes()
    assert len([first, *records]) == 7 and result.shards_skipped == 0
    assert any(f"lost its node {lost}" in m for m in caplog.messages), "\n".join(caplog.messages)  # the node was inside a job, which ran again
    assert output_files(hub, "me/lost-node", tmp_path) == one_machine["nf4"]


def run_to_end(run) -> tuple[list, streamq.RequantizeResult]:
    records = []
    while True:
        try:
            records.append(next(run))
        except StopIteration as done:
            return records, done.value


@pytest.mark.slow
def test_the_driver_killed_then_run_again_resumes_from_the_manifest(tmp_path: Path, hub: LocalHub, cluster: Cluster, one_machine: dict) -> None:
    """kill -9 of the driver right after its second commit (its jobs die with it, as Ray ends a dead
    driver's tasks); the same command, run again, converts only what was not committed or uploaded."""
    slow = hub.faults.add(Fault.throttle(16384, 0.1, path="/storage/", times=None))
    args = ["requantize", "org/model", "me/driver-lost", "--endpoint", hub.endpoint, "--token", TOKEN, "--max-shard-size", OUT_SHARD, "--cluster", cluster.address]
    try:
        killed = subprocess.run([sys.executable, str(RUNNER), "after-commit", "2", "--", *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    finally:
        hub.faults.remove(slow)
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = json.loads(Path(hf_hub_download("me/driver-lost", "streamq_manifest.json", local_dir=tmp_path / "m", endpoint=hub.endpoint, token=TOKEN)).read_text())
    committed = len(manifest["shards"]) + len(manifest["pending"])
    assert committed >= 1 and manifest["status"] == "in_progress"
    result = convert(hub, "me/driver-lost", cluster=cluster.address)
    assert result.shards_skipped >= committed
    assert output_files(hub, "me/driver-lost", tmp_path) == one_machine["nf4"]


@pytest.mark.slow
def test_a_source_file_failing_its_check_on_a_node_ends_the_run_in_one_line_and_nothing_made_from_it_is_published(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cluster: Cluster
) -> None:
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src", family="llama_wide", max_shard_size="2MB"))
        victim = "model-00003-of-00005.safetensors"
        sha = next(s.lfs.sha256 for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename == victim)
        stored = next(p for p in (tmp_path / "hub").rglob(sha[2:]) if p.is_file())
        data = bytearray(stored.read_bytes())
        data[-10] ^= 0xFF  # same size, other bytes: only the sha256 check can tell
        stored.write_bytes(bytes(data))
        with pytest.raises(streamq.CorruptShardError, match=f"{victim}: the downloaded bytes have sha256 .* never committed, and are dropped") as failed:
            convert(hub, "me/corrupt", cluster=cluster.address)
        assert "\n" not in str(failed.value)
        manifest = json.loads(Path(api.hf_hub_download("me/corrupt", "streamq_manifest.json", local_dir=tmp_path / "m")).read_text())
        made_from = {f for entry in [*manifest["shards"].values(), *manifest["pending"].values()] for f in entry["inputs"]}
        assert victim not in made_from and manifest["status"] == "in_progress"
        assert "config.json" not in api.list_repo_files("me/corrupt")


def test_a_node_with_another_streamq_fails_its_job_and_the_run_says_so_in_one_line(hub: LocalHub, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamq, "__version__", "9.9.9")  # the driver's; the nodes' processes import the real one
    with pytest.raises(streamq.StreamqError, match=r"^node \w+ runs streamq 0\.1\.0 but the driver runs 9\.9\.9; install the same version on every node$"):
        convert(hub, "me/versions", cluster=cluster.address)


@pytest.mark.parametrize("options, message", [
    ({"format": "gguf"}, "a cluster run writes safetensors formats .*a GGUF conversion runs on one machine: drop cluster"),
    ({"dst": "./local-out"}, "a cluster run reads from and publishes to the Hub"),
])
def test_what_a_cluster_run_cannot_do_is_refused_before_planning(hub: LocalHub, tmp_path: Path, options: dict, message: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    dst = options.pop("dst", "me/refused")
    with pytest.raises(streamq.StreamqError, match=message):
        stream_requantize("org/model", dst, endpoint=hub.endpoint, token=TOKEN, progress=False, cluster="auto", **options)
    assert not (tmp_path / "local-out").exists()


def test_without_ray_the_cluster_option_says_how_to_install_it(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(streamq.StreamqError, match=r'cluster needs Ray: pip install "streamq\[ray\]"'):
        convert(hub, "me/no-ray", cluster="auto")


@pytest.mark.parametrize("count", [1, 2, 4, 6, 20])
def test_jobs_cover_every_output_once_and_check_every_file_once(hub: LocalHub, count: int) -> None:
    plan = plan_requantize("org/model", endpoint=hub.endpoint, token=TOKEN, max_shard_size="300KB")
    layout, sizes = plan.layout, [s.size for s in plan.shards]
    todo = list(range(len(plan.outputs)))
    jobs = split_jobs(plan, todo, set(range(len(sizes))), count)
    assert [i for job in jobs for i in job.outputs] == todo  # consecutive, in order, each once
    assert sorted(f for job in jobs for f in job.checks) == list(range(len(sizes)))
    assert len(jobs) == min(count, len(todo))
    shares = [sum(plan.stored_at[p].end - plan.stored_at[p].start for i in job.outputs for item in layout.outputs[i].items for p in layout.parts[item]) for job in jobs]
    assert max(shares) <= 2.5 * plan.input_bytes / len(jobs)  # about even
    for job in jobs:
        reads = {r.file: r for r in job_reads(plan, job.outputs, job.checks)}
        for f, (start, end) in spans(plan, job.outputs).items():  # every byte the job converts is read
            assert reads[f].start.offset <= start and (reads[f].end is None or end <= reads[f].end)
        for f in job.checks:  # a checked file is read whole, from its first byte, and hashed
            assert reads[f].start.offset == 0 and reads[f].end is None and reads[f].check


def test_a_file_only_pending_shards_wait_for_gets_a_job_that_checks_it(hub: LocalHub) -> None:
    plan = plan_requantize("org/model", endpoint=hub.endpoint, token=TOKEN, max_shard_size="300KB")
    sizes = [s.size for s in plan.shards]
    last = len(plan.outputs) - 1
    jobs = split_jobs(plan, [last], {0, len(sizes) - 1}, 3)
    assert [(j.outputs, j.checks) for j in jobs] == [((last,), (len(sizes) - 1,)), ((), (0,))]


def test_the_page_runs_its_conversions_on_the_cluster_and_shows_the_whole_clusters_progress(
    tmp_path: Path, hub: LocalHub, cluster: Cluster, one_machine: dict
) -> None:
    from streamq.app.run import Conversion, RunProgress

    run = RunProgress(Conversion("org/model", "me/page", token=TOKEN, endpoint=hub.endpoint, cluster=cluster.address), tmp_path / "w")
    run.start()
    phases = []
    while not run.wait(0.2):
        phases.append(run.snapshot().phase)
    done = run.snapshot()
    assert done.error is None and done.result is not None and done.phase == "done"
    assert any("jobs on 3 nodes" in p for p in phases), set(phases)
    assert done.bytes_done == done.bytes_total == done.result.bytes_in
    assert verify_output("me/page", endpoint=hub.endpoint, token=TOKEN).ok
