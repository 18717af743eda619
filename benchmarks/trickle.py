"""Issue 26's proxy: some download connections deliver 64 kB/s after their first 256 kB.

A Llama-shaped bf16 model in 8 files is served by the loopback Hub emulator over a link of --mbps per
connection; streamq converts it to NF4 (defaults, real stall constants) three times, each in a subprocess:

1. clean    no trickle: the baseline;
2. proxy    the run's first download connection trickles (nothing faster has been seen yet: the case of the
            report), and every other request to the emulator's storage with probability --p (a seeded draw;
            header reads, under 256 kB, are drawn too but not slowed);
3. previous the proxy again with the rule before issue 26 (a connection is compared only with faster ones
            seen before it: no fresh connection to learn the link), stopped after --cap seconds.

    python benchmarks/trickle.py --json benchmarks/results/trickle_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the emulator speaks LFS; read by huggingface_hub at import

CHILD = """
import sys, time, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import streamq.stall as stall
if sys.argv[3] == "previous":
    stall.SpeedHistory.may_probe = lambda self, now: False
    stall.SpeedHistory.probe = lambda self, now: False
from streamq import stream_requantize
started = time.monotonic()
stream_requantize("org/model", sys.argv[2], endpoint=sys.argv[1], progress=False)
print("WALL", time.monotonic() - started)
"""


def build(dest: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest, max_shard_size="40MB")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbps", type=float, default=5.0, help="per-connection link speed, MB/s")
    parser.add_argument("--p", type=float, default=0.25, help="probability that a download connection trickles")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds after which a run is stopped")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from huggingface_hub import HfApi

    from streamq.testing import Fault, LocalHub

    root = Path(tempfile.mkdtemp(prefix="streamq-trickle-"))
    src = build(root / "src")
    files = sorted(p.name for p in src.glob("*.safetensors"))
    size = sum((src / f).stat().st_size for f in files)
    results: dict[str, dict] = {}
    with LocalHub(root / "hub") as hub:
        HfApi(endpoint=hub.endpoint, token="x").create_repo("org/model")
        HfApi(endpoint=hub.endpoint, token="x").upload_folder(repo_id="org/model", folder_path=src)
        chunk = 64 << 10
        link = Fault.throttle(chunk, chunk / (args.mbps * 1e6), method="GET", path=r"^/storage/", times=None)
        info = HfApi(endpoint=hub.endpoint).model_info("org/model", files_metadata=True)
        first = next(s.lfs.sha256 for s in info.siblings if s.rfilename == files[0])
        for scenario in ("clean", "proxy", "previous"):
            hub.faults.clear()
            hub.faults.seed(26)
            trickles = [  # the first file's two header reads (planning), then its download, which trickles
                Fault.trickle(256 << 10, 6400, 0.1, method="GET", path=rf"^/storage/.*/{first}$", times=3),
                Fault.trickle(256 << 10, 6400, 0.1, method="GET", path=r"^/storage/", times=None, probability=args.p),
            ]
            for trickle in trickles if scenario != "clean" else ():
                hub.faults.add(trickle)
            hub.faults.add(link)
            env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "STREAMQ_WORK_DIR": str(root / "work")}
            command = [sys.executable, "-c", CHILD, hub.endpoint, f"me/{scenario}", scenario]
            started = time.monotonic()
            try:
                run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.cap)
                finished, log = run.returncode == 0, run.stdout + run.stderr
            except subprocess.TimeoutExpired as exc:
                finished, log = False, (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
            wall = time.monotonic() - started
            results[scenario] = {
                "finished": finished,
                "wall_s": round(wall, 1) if finished else None,
                "stopped_after_s": None if finished else round(wall, 1),
                "trickle_draws": sum(t.fired for t in trickles) if scenario != "clean" else 0,
                "connections_given_up": log.count("giving up this connection"),
                "given_up_to_learn_the_link": log.count("to learn from a fresh one"),
            }
            print(scenario, results[scenario], flush=True)
    record = {
        "what": "NF4, Hub to Hub, 8 source files; the first download connection and some others trickle (64 kB/s after their first 256 kB)",
        "trickle_draws": "requests the trickle fault took, header reads under 256 kB (not slowed) included",
        "model_bytes": size, "files": len(files), "link_mb_per_s_per_connection": args.mbps, "trickle_probability": args.p,
        "cap_s": args.cap, "results": results,
        "ratio_proxy_to_clean": round(results["proxy"]["wall_s"] / results["clean"]["wall_s"], 2)
        if results["proxy"]["finished"] and results["clean"]["finished"] else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "python benchmarks/trickle.py " + " ".join(sys.argv[1:]),
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
