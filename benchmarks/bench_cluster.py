"""Wall time of a conversion on a Ray cluster of 1, 2 and 4 worker nodes against the same conversion on one
machine, Hub to Hub, every node's transfers held to one link's speed.

The nodes are Ray nodes started on this machine (`ray.cluster_utils.Cluster`: each its own raylet and worker
processes), `--cpus-per-node` CPUs each; the Hub is the emulator. A node moves its bytes over one download
and one upload connection at a time, and the emulator holds each connection to `--link-mbps` (bench_pipeline's
`Network`, calibrated there), so a node's transfers run at about one link's speed, as a separate machine's
would. The one-machine run gets the same link. Each run's output is checked byte for byte against the
one-machine run's, and the object store's created bytes are read from Ray.

    python benchmarks/bench_cluster.py --model dense --nodes 1,2,4 --link-mbps 8 --json benchmarks/results/cluster_cpu2_dense.json
    python benchmarks/bench_cluster.py --model fp8-moe --nodes 1,2,4 --link-mbps 4 --json benchmarks/results/cluster_cpu2_fp8moe.json
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
sys.path.insert(0, str(Path(__file__).parent))

MB = 1_000_000
TOKEN = "hf_bench"


def build_source(model: str, dest: Path) -> None:
    if model == "dense":
        from bench_pipeline import ModelSpec, build_model

        build_model(ModelSpec(hidden=1024, intermediate=2816, layers=24, vocab=32000, heads=16, kv_heads=4, shard_bytes=50 * MB), dest, seed=0)
    else:
        from fp8_source import MoESpec, build_fp8_model

        build_fp8_model(MoESpec(layers=8, experts=32, shard_bytes=40 * MB), dest, seed=0)


def output_digests(endpoint: str, repo: str) -> dict[str, str]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=TOKEN).model_info(repo, files_metadata=True)
    return {s.rfilename: s.lfs.sha256 if s.lfs else "" for s in info.siblings or [] if s.rfilename.endswith(".safetensors")}


def plasma_created(address: str) -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(address)).store_stats.cumulative_created_bytes


class Said(logging.Handler):
    """The records streamq logs during a run: the one-machine peak of work_dir, each cluster job's end."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def convert(hub: Any, out: str, args: argparse.Namespace, cluster: str | None) -> dict[str, Any]:
    from streamq import stream_requantize

    hub.requests.clear()
    said = Said()
    for name in ("streamq.pipeline", "streamq.cluster.driver"):
        logging.getLogger(name).addHandler(said)
        logging.getLogger(name).setLevel(logging.INFO)
    started = time.monotonic()
    try:
        result = stream_requantize(
            "org/model", out, endpoint=hub.endpoint, token=TOKEN, progress=False, max_shard_size=args.max_shard_size,
            quant_type=args.quant_type, cluster=cluster,
        )
    finally:
        for name in ("streamq.pipeline", "streamq.cluster.driver"):
            logging.getLogger(name).removeHandler(said)
    wall = time.monotonic() - started
    ends = [r.job_end for r in said.records if hasattr(r, "job_end")]
    peaks = [r.args for r in said.records if r.getMessage().startswith("peak work_dir use")]
    disk = {"peak_disk": max(e.peak_disk for e in ends), "disk_budget": ends[0].disk_budget, "peak_worker_rss": max(e.peak_rss for e in ends)} if ends else (
        {"peak_disk": peaks[0][0], "disk_budget": peaks[0][1]} if peaks else {}
    )
    return {
        **disk,
        "wall_s": round(wall, 2), "bytes_in": result.bytes_in, "bytes_out": result.bytes_out, "shards": result.shards,
        "downloaded_bytes": hub.requests.sent(r"^/storage/"), "input_mb_per_s": round(result.bytes_in / wall / MB, 2),
        "hub_requests": sum(1 for _ in hub.requests), "commits": sum(1 for r in hub.requests if r.method == "POST" and "/commit/" in r.path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["dense", "fp8-moe"], default="dense")
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--link-mbps", type=float, default=8.0, help="each connection's speed, MB/s")
    parser.add_argument("--quant-type", default="nf4")
    parser.add_argument("--max-shard-size", default="20MB")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import ray
    from bench_pipeline import Network, use_network
    from huggingface_hub import HfApi
    from ray.cluster_utils import Cluster

    from streamq.testing import LocalHub

    area = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    atexit.register(shutil.rmtree, area, ignore_errors=True)
    os.environ["STREAMQ_WORK_DIR"] = str(area / "work")
    build_source(args.model, area / "src")
    report: dict[str, Any] = {"model": args.model, "link_mb_per_s": args.link_mbps, "cpus_per_node": args.cpus_per_node,
                              "machine_cpus": os.cpu_count(), "quant_type": args.quant_type, "max_shard_size": args.max_shard_size, "runs": []}
    with LocalHub(area / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=area / "src")
        sizes = {s.rfilename: s.size for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename.endswith(".safetensors")}
        report["source"] = {"files": len(sizes), "bytes": sum(sizes.values())}
        use_network(hub, Network(args.link_mbps * MB))
        one = convert(hub, "me/one", args, None)
        reference = output_digests(hub.endpoint, "me/one")
        report["one_machine"] = one
        print(f"one machine: {one}", flush=True)
        for count in [int(n) for n in args.nodes.split(",")]:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(count):
                cluster.add_node(num_cpus=args.cpus_per_node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            try:
                before = plasma_created(cluster.address)
                run = convert(hub, f"me/nodes{count}", args, cluster.address)
                run.update(nodes=count, object_store_bytes=plasma_created(cluster.address) - before,
                           identical=output_digests(hub.endpoint, f"me/nodes{count}") == reference,
                           speedup_vs_one_machine=round(one["wall_s"] / run["wall_s"], 2))
            finally:
                ray.shutdown()
                cluster.shutdown()
            report["runs"].append(run)
            print(f"{count} nodes: {run}", flush=True)
    report["commit"] = os.popen("git -C %s rev-parse --short HEAD" % Path(__file__).parent).read().strip()
    report["digest_of_reference"] = hashlib.sha256(json.dumps(reference, sort_keys=True).encode()).hexdigest()[:16]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
