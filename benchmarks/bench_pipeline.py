"""Issue 4, "the network is the bottleneck, never streamq": streamq Hub->Hub against a plain transfer.

A synthetic Llama (bf16, safetensors files) is served by streamq's loopback Hub emulator, throttled to a
user-like bandwidth, and the scenarios below run side by side, each in its own subprocess so that its peak RSS
(VmHWM) and CPU time are its own, while the parent polls the size of its working area every 20 ms:

1. raw      stream every source file over HTTP as hf_hub_download would (metadata request, GET of the location,
            huggingface_hub's session and headers) and drop the bytes, so no file is ever on disk; upload a random
            file of each of streamq's output shard sizes (its plan's, cut at max_shard_size) once the stream has passed
            that shard's last source byte, one upload at a time, then one commit: streamq's pipeline without its work;
2. strict   streamq with its default disk budget (the largest tensor + 1 GB of read-ahead + two output shards);
3. overlap  streamq with 4 GB of read-ahead instead of 1 (disk_budget = largest tensor + 4 GB + two output shards);
4. recipe   transformers from_pretrained(BitsAndBytesConfig nf4) through the HF cache, save_pretrained,
            HfApi.upload_folder; on the device streamq quantizes on (device_map "cuda" when --device resolves to
            CUDA, as from_pretrained does by itself on a GPU machine, else "cpu");
5. int4     streamq writing compressed-tensors int4 W4A16 (group size 32) instead of NF4, with its default disk
            budget (streamq sizes it from int4's own output shards);
6. llmcompressor  llm-compressor's own route to the same int4 (issue 21's comparison), as a user runs it:
            model_free_ptq("org/model", <save dir>, scheme=W4A16 with int4's group size, ignore=<the modules
            streamq keeps, from its int4 plan>, device="cpu"), which fetches the whole repo through the HF cache
            (inside the measured area, so its disk counts), then HfApi.upload_folder of the result to a new repo.
            llm-compressor pins its own transformers and compressed-tensors, so this child runs in the
            reference virtualenv's python ($STREAMQ_INT4_REFERENCE, else .ref-venv/bin/python in the checkout,
            as tests/int4_cases.py finds it; the scenario is refused without one); its code imports only what
            that venv has (no streamq, no bitsandbytes). It quantizes on the CPU whatever --device says (the
            reference venv holds a CPU torch), and --timeline records nothing for it.

Only when named in --scenarios, an ablation: `unchecked` is overlap with the sha256 of the downloaded input
taken out (`ablation.py`), which measures what that check costs; streamq itself always checks.

Wall time is taken inside each child around the work itself, after its imports (torch, transformers and
bitsandbytes for the quantizing scenarios), so start-up, the same for every run, does not blur the ratios.
The emulator only throttles response bodies, so uploads are slowed by a per-request delay growing with
their size instead (see `Network.faults`); `calibrate` checks that both directions run near nominal (a
probe downloads the first --probe-mb of the largest file). The throttle is per connection, and transformers
downloads a checkpoint's shards over up to 8 connections at once, and upload_folder sends up to 5 files at
once, so the recipe's wall time under a throttle is optimistic, and llmcompressor's upload part (its
model_free_ptq fetches one file at a time); their disk and RAM are not affected. Every run also records
the bytes the emulator sent of each source file (`source_bytes_served`: each byte once, plus what planning
reads of its header).

    python benchmarks/bench_pipeline.py                          # ~4.5 GB model in 10 shards, 200 MB/s, then unthrottled
    python benchmarks/bench_pipeline.py --layers 4 --repeat 2 --no-unthrottled --json /tmp/small.json
    python benchmarks/bench_pipeline.py --child-cpus 2 --device cpu --scenarios raw,overlap   # a 2-core VM, on a bigger box
    python benchmarks/bench_pipeline.py --layers 6 --shard-mb 100 --scenarios raw,overlap --timeline   # when each stage ran
    python benchmarks/bench_pipeline.py --fp8-moe --hidden 1024 --intermediate 2816 --layers 12 --heads 8 \
        --shard-mb 300 --scenarios raw,strict,overlap                 # a DeepSeek-shaped FP8 MoE source, ~1.3 GB

`--fp8-moe` builds a DeepSeek-V3-shaped block-FP8 MoE checkpoint instead (fp8_source.py; sized by --hidden,
--intermediate, --layers, --heads, --vocab, --shard-mb, --experts, --moe-intermediate), which streamq dequantizes
in the stream. The recipe scenario does not run on it: transformers 5.25 cannot dequantize DeepSeek's partial
FP8 blocks.

`--kill-resume kept,fresh` then kills streamq (strict's settings) with SIGKILL once the emulator has sent
--kill-at (a fraction) of the largest source file, and runs the same command again to the same output, with
the same work_dir and then, on another output, with a new one; --kill-json gets what the killed run left
(committed, pending and journalled shards, hash checkpoints), what the second run downloaded again (bytes the
emulator sent of each file, against the least a resumed run must fetch: every unchecked file from its saved
hash state), how many output shards it made again or skipped, and whether its output equals strict's.

At the seed's scale (a Gemma-4-31B-shaped model, 60.4 GB bf16: Llama tensor names with Gemma's sizes and
tied embedding), the emulator's repos on a RAM-backed tmpfs and the source written straight into its storage,
sparse (each file its header and a hole: no disk, no RAM, tensors of zeros, the sha256 from sparse_sha256.json),
in transformers 5's layout (`--shard-mb 50000`: one 49.9 GB file and one of 10.5 GB) with the kill and
resume, then in the older one of 13 files of 5 GB:

    GEMMA="--hidden 5376 --layers 60 --intermediate 21504 --vocab 262144 --heads 32 --kv-heads 16 --head-dim 256 \
        --tie-embeddings --source-direct --sparse --bandwidth-mbps 1000 --no-unthrottled --calibration-rounds 2"
    python benchmarks/bench_pipeline.py $GEMMA --shard-mb 50000 --hub-dir /dev/shm/hub-2shard --scenarios raw,strict \
        --kill-resume kept,fresh --json pipeline_h200_gemma31b_2shard.json --kill-json kill_resume_gemma31b_2shard.json
    python benchmarks/bench_pipeline.py $GEMMA --shard-mb 5000 --hub-dir /dev/shm/hub-13x5 --scenarios raw,strict \
        --json pipeline_h200_gemma31b_13x5gb.json

GGUF (issue 27): `gguf_TYPE` is streamq to GGUF (format="gguf", quant_type=TYPE); `llamacpp_TYPE` is llama.cpp's
own route (snapshot_download of the whole repo, convert_hf_to_gguf.py to bf16, llama-quantize on os.cpu_count()
threads, upload_file), the converter from $STREAMQ_LLAMA_CPP (or streamq's cached copy), llama-quantize from
$LLAMA_QUANTIZE; the source repo gets the small tokenizer of tests/gguf_cases.py, and `--shapes-from gguf_TYPE`
makes the raw run upload files of the GGUF plan's sizes. A sparse source is all zeros, which the quantizers
handle faster than real weights: there the walls say what the pipeline costs, not what quantizing does
(benchmarks/gguf_speed.py measures that on real values):

    python benchmarks/bench_pipeline.py $GEMMA --shard-mb 50000 --hub-dir /dev/shm/hub --scenarios raw,gguf_q4_k_m,gguf_q4_0 \
        --shapes-from gguf_q4_k_m --json gguf_pipeline.json

`--child-cpus N` pins every scenario to N cores and the emulator to the others, so that a machine with
many cores measures what a small VM would see from a Hub elsewhere (on the 2-core machine itself the
emulator and the scenario share the cores).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ablation  # beside this script
import timeline
from fp8_source import MoESpec, build_fp8_model

os.environ["HF_HUB_DISABLE_XET"] = "1"  # read at import: the emulator speaks git-LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = "org/model"
TOKEN = "hf_bench"
OUTPUT_NAMESPACE = "me"  # every scenario's output repo, deleted after its run
MB = 1_000_000
GB = 1_000_000_000
POLL_SECONDS = 0.02
SCENARIOS = ("raw", "strict", "overlap", "recipe", "int4", "llmcompressor")
INT4_GROUP = 32  # int4's group size, for streamq and for llm-compressor's W4A16 alike
ABLATIONS = ("unchecked",)  # run only when asked for
GGUF_ROUTES = ("gguf", "llamacpp")  # `gguf_TYPE`: streamq to GGUF; `llamacpp_TYPE`: llama.cpp's own route (issue 27)


def base_scenario(name: str) -> str:
    """`gguf_q4_k_m` -> `gguf`, `llamacpp_q4_0` -> `llamacpp`; any other scenario is its own base."""
    head, sep, _ = name.partition("_")
    return head if sep and head in GGUF_ROUTES else name


def gguf_type(name: str) -> str:
    return name.partition("_")[2]
DEVICES = ("auto", "cpu", "cuda")
METADATA_ALLOWANCE = 65_536  # config.json and huggingface_hub metadata beside the shards, 4 KiB blocks each


# ---------------------------------------------------------------- the synthetic model


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 48
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4
    shard_bytes: int = 500 * MB
    head_dim: int | None = None  # None: hidden / heads, as LlamaConfig derives it
    tie_embeddings: bool = False  # True: no lm_head tensor stored (Gemma-like)

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in transformers' Llama checkpoint order (untied lm_head by default, like TinyLlama)."""
        head_dim = self.head_dim or self.hidden // self.heads
        yield "model.embed_tokens.weight", (self.vocab, self.hidden)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.self_attn.q_proj.weight", (self.heads * head_dim, self.hidden)
            yield f"{p}.self_attn.k_proj.weight", (self.kv_heads * head_dim, self.hidden)
            yield f"{p}.self_attn.v_proj.weight", (self.kv_heads * head_dim, self.hidden)
            yield f"{p}.self_attn.o_proj.weight", (self.hidden, self.heads * head_dim)
            yield f"{p}.mlp.gate_proj.weight", (self.intermediate, self.hidden)
            yield f"{p}.mlp.up_proj.weight", (self.intermediate, self.hidden)
            yield f"{p}.mlp.down_proj.weight", (self.hidden, self.intermediate)
            yield f"{p}.input_layernorm.weight", (self.hidden,)
            yield f"{p}.post_attention_layernorm.weight", (self.hidden,)
        yield "model.norm.weight", (self.hidden,)
        if not self.tie_embeddings:
            yield "lm_head.weight", (self.vocab, self.hidden)

    def shards(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Tensors grouped greedily into shards of at most `shard_bytes` (bf16), as save_pretrained does."""
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in self.tensors():
            nbytes = 2 * _numel(shape)
            if groups[-1] and size + nbytes > self.shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape))
            size += nbytes
        return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_config(spec: ModelSpec) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim or spec.hidden // spec.heads, max_position_embeddings=2048,
        tie_word_embeddings=spec.tie_embeddings, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],  # as save_pretrained of a model writes it; llama.cpp's converter needs it
    )


def build_model(spec: ModelSpec, dest: Path, seed: int) -> None:
    """Write config.json, the shards and the index; one shard's tensors in memory at a time."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    llama_config(spec).save_pretrained(dest)
    groups = spec.shards()
    weight_map: dict[str, str] = {}
    total = 0
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for number, group in enumerate(groups, 1):
            name = shard_name(number, len(groups))
            tensors = {key: _random_weight(key, shape, seed, pool) for key, shape in group}
            save_file(tensors, dest / name, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def sparse_prefix(group: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """The first bytes of a bf16 safetensors file holding `group` (its length and its header, padded with
    spaces to 8 bytes as safetensors pads it; tensors laid out by name, as save_file lays them out), and
    the data bytes that follow."""
    entries, offset = {}, 0
    for name, shape in sorted(group):
        size = 2 * _numel(shape)
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, offset


SPARSE_DIGESTS = Path(__file__).with_name("sparse_sha256.json")  # prefix sha256:data bytes -> file sha256


def zeros_sha256(prefix: bytes, zeros: int) -> str:
    """sha256 of `prefix` followed by `zeros` zero bytes (hashlib releases the GIL: files hash in parallel)."""
    digest = hashlib.sha256(prefix)
    block = memoryview(bytes(64 << 20))
    while zeros:
        step = min(zeros, len(block))
        digest.update(block[:step])
        zeros -= step
    return digest.hexdigest()


def sparse_digests(files: list[tuple[bytes, int]]) -> tuple[list[str], int]:
    """The sha256 of each sparse file (prefix, data bytes): from SPARSE_DIGESTS when listed there (a
    60 GB source hashes for half a minute or more: its zeros cannot be skipped), else computed, all
    files at once, and added to that file. Returns the digests and how many were computed."""
    try:
        known = json.loads(SPARSE_DIGESTS.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    keys = [f"{hashlib.sha256(prefix).hexdigest()}:{zeros}" for prefix, zeros in files]
    missing = [i for i, key in enumerate(keys) if key not in known]
    with ThreadPoolExecutor(max(1, min(len(missing), os.cpu_count() or 1))) as pool:
        for i, digest in zip(missing, pool.map(lambda i: zeros_sha256(*files[i]), missing)):
            known[keys[i]] = digest
    if missing:
        try:
            SPARSE_DIGESTS.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
        except OSError:
            pass  # a read-only copy: computed again next time
    return [known[key] for key in keys], len(missing)


RANDOM_PIECE = 1 << 24  # values per generator: pieces are filled on all cores at once


def _random_weight(name: str, shape: tuple[int, ...], seed: int, pool: ThreadPoolExecutor) -> Any:
    """Norm weights near 1, everything else small normal values, as in a trained checkpoint.

    One generator alone makes about 100-200 M values/s, minutes for a 61 GB model, so each piece of the
    tensor has its own generator, seeded from (seed, name, offset): the same seed gives the same model
    whatever the number of cores.
    """
    import torch

    weight = torch.empty(shape, dtype=torch.bfloat16)
    flat = weight.view(-1)

    def fill(start: int) -> None:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{start}".encode()))
        piece = flat[start:start + RANDOM_PIECE]
        values = torch.randn(piece.numel(), generator=generator, dtype=torch.float32).mul_(0.02)
        if name.endswith("norm.weight"):
            values.add_(1.0)
        piece.copy_(values)

    list(pool.map(fill, range(0, flat.numel(), RANDOM_PIECE)))
    return weight


# ---------------------------------------------------------------- the emulated network


@dataclass(frozen=True)
class Network:
    """A nominal per-transfer bandwidth (bytes/s), and the seconds per byte the emulator itself adds to
    the waits that the throttle inserts (measured by `calibrate`), so that transfers run near nominal."""

    bandwidth: float
    download_cost: float = 0.0
    upload_cost: float = 0.0

    def faults(self) -> list[Any]:
        """Faults that hold each download and each upload to about `bandwidth`.

        Downloads: Fault.throttle on storage GETs, 1 MB pieces. Uploads: Fault.throttle acts on response
        bodies only, so an upload PUT is delayed instead, by an amount that grows with its size (the last
        segment of the storage URL, matched by its length and first two digits: within 5%).
        """
        from streamq.testing import Fault

        chunk = 1 << 20
        pause = max(0.0, chunk * (1 / self.bandwidth - self.download_cost))
        faults = [Fault.throttle(chunk, pause, method="GET", path=r"^/storage/", times=None)]
        per_byte = max(0.0, 1 / self.bandwidth - self.upload_cost)
        for digits in range(4, 13):
            for lead in range(10, 100):
                size = (lead + 0.5) * 10 ** (digits - 2)
                pattern = rf"^/storage/.*/{lead}\d{{{digits - 2}}}$"
                faults.append(Fault.delay(size * per_byte, method="PUT", path=pattern, times=None))
        return faults


def use_network(hub: Any, network: Network | None) -> None:
    hub.faults.clear()
    for fault in network.faults() if network else []:
        hub.faults.add(fault)


# ---------------------------------------------------------------- measuring a child


@dataclass
class Measurement:
    scenario: str
    wall_s: float  # the work itself, timed inside the child after its imports
    process_s: float  # the whole child, interpreter start-up and imports included
    peak_disk: int  # bytes allocated in the scenario's working area
    peak_rss: int  # bytes: the child's VmHWM, its peak resident set since exec
    cpu_s: float  # user + system seconds of the child
    details: dict[str, Any] = field(default_factory=dict)


class Served:
    """Bytes the emulator has sent of each source file, from its request log's count of response body
    bytes by path (a storage URL ends with the object's sha256): whole files and Range requests alike."""

    hub: Any = None  # the LocalHub of this process, once started

    def snapshot(self, objects: dict[str, str]) -> dict[str, int]:
        """Bytes sent so far of each source file (`objects`: sha256 -> name)."""
        if self.hub is None:
            return {name: 0 for name in objects.values()}
        return {name: self.hub.requests.sent(rf"^/storage/.*/{sha}$") for sha, name in objects.items()}

    def since(self, before: dict[str, int], objects: dict[str, str]) -> dict[str, int]:
        now = self.snapshot(objects)
        return {name: now[name] - before.get(name, 0) for name in now}


SERVED = Served()


def source_objects(endpoint: str) -> dict[str, str]:
    """The source's LFS files: sha256 -> file name (what Served counts by)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=TOKEN).model_info(SOURCE, files_metadata=True)
    return {s.lfs.sha256: s.rfilename for s in info.siblings or [] if s.lfs}


def directory_bytes(root: Path) -> int:
    """Allocated bytes under `root`, tolerating files that vanish while we walk."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskPoller:
    """Peak size of a directory tree, sampled every POLL_SECONDS in a thread of the parent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.peak = max(self.peak, directory_bytes(self.root))

    def __enter__(self) -> DiskPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, directory_bytes(self.root))


def child_python(scenario: str) -> str:
    """This interpreter, or for llmcompressor the reference virtualenv's python: $STREAMQ_INT4_REFERENCE,
    else .ref-venv in the checkout (as tests/int4_cases.py finds it)."""
    if scenario != "llmcompressor":
        return sys.executable
    path = os.environ.get("STREAMQ_INT4_REFERENCE") or str(REPO_ROOT / ".ref-venv" / "bin" / "python")
    if not Path(path).is_file():
        raise SystemExit(f"the llmcompressor scenario runs in llm-compressor's virtualenv, and {path} is missing: "
                         f"set STREAMQ_INT4_REFERENCE to its python (.ci/run shows how it is built)")
    return path


def start_child(scenario: str, params: dict[str, Any], area: Path, cpus: set[int] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one scenario in a fresh interpreter; it writes its figures to the returned file when done."""
    result_file = area.parent / f"{area.name}.result.json"
    area.mkdir(parents=True)
    payload = json.dumps({"scenario": scenario, "area": str(area), "result": str(result_file), **params})
    python = child_python(scenario)
    # the caller's PYTHONPATH (carried wheels) stays behind ours, and away from the reference venv's own packages
    extra = os.environ.get("PYTHONPATH") if python == sys.executable else None
    env = {**os.environ, "HF_HOME": str(area / "hf_home"), "HF_ENDPOINT": params["endpoint"], "HF_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), extra)))}
    # huggingface_hub reads HF_ENDPOINT at import
    proc = subprocess.Popen(
        [python, __file__, "--child", payload], env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    return proc, result_file


def run_child(scenario: str, params: dict[str, Any], area: Path, cpus: set[int] | None = None, watch: Path | None = None) -> Measurement:
    """Run one scenario in a fresh interpreter, polling its working area (or `watch`) for the peak disk use.

    Peak RSS is the child's own VmHWM: ru_maxrss from wait4 would count the pages the child shared with
    this (torch-importing) parent between fork and exec.
    """
    started = time.monotonic()
    with DiskPoller(watch or area) as poller:
        proc, result_file = start_child(scenario, params, area, cpus)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    process_s = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"scenario {scenario} failed with exit code {proc.returncode}")
    child = json.loads(result_file.read_text())
    result_file.unlink()
    return Measurement(
        scenario, child.pop("wall_s"), process_s, poller.peak, child.pop("peak_rss"),
        usage.ru_utime + usage.ru_stime, child,
    )


# ---------------------------------------------------------------- the scenarios (run in the child)


def child_main(payload: dict[str, Any]) -> None:
    """Entry point of a scenario subprocess: set up (imports, inputs), then time the work alone."""
    area = Path(payload["area"])
    scenario = {
        "probe": probe, "raw": raw_transfer, "strict": streamq_run, "overlap": streamq_run, "unchecked": streamq_run,
        "int4": streamq_run, "gguf": streamq_run,
        "recipe": transformers_recipe, "llmcompressor": llmcompressor_route, "llamacpp": llamacpp_route,
    }
    with ExitStack() as stack:
        if payload["scenario"] == "unchecked":
            stack.enter_context(ablation.input_check_removed())
        events = stack.enter_context(timeline.recording()) if payload.get("timeline") else None
        started = time.perf_counter()
        work = scenario[base_scenario(payload["scenario"])](payload, area)
        setup_s = time.perf_counter() - started
        rss_after_setup = _proc_status("VmRSS")  # imports (and inputs made up front): what the work adds is above it
        started = time.perf_counter()
        with ThreadCpu() as threads:
            details = work()
        wall_s = time.perf_counter() - started
    # a route that runs tools as subprocesses (llamacpp) reports their peaks: the largest process counts
    peak_rss = max(_proc_status("VmHWM"), details.get("tool_peak_rss", 0))
    result = {"thread_cpu_s": threads.by_name(), "wall_s": wall_s, "setup_s": setup_s, "rss_after_setup": rss_after_setup, "peak_rss": peak_rss, **details}
    if events is not None:  # on the work's clock, stages of the setup left out
        result["timeline"] = [(stage, detail, thread, start - started, end - started) for stage, detail, thread, start, end in events if end >= started]
    Path(payload["result"]).write_text(json.dumps(result))


class ThreadCpu:
    """CPU seconds of the work by thread name (pool threads counted together), to show where CPU goes.

    Threads come and go (a download's hashing thread lives as long as the download), so /proc/self/task is
    sampled every 50 ms and each thread's last figure counts; the thread names come from `threading`.
    """

    def __init__(self) -> None:
        self._cpu: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._start = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> dict[int, float]:
        for thread in threading.enumerate():
            if thread.native_id is not None:
                self._names[thread.native_id] = re.sub(r"_\d+$", "", thread.name)
        ticks = os.sysconf("SC_CLK_TCK")
        for task in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{task}/stat").read_text()
            except OSError:  # ended since the listing
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            self._cpu[int(task)] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return dict(self._cpu)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_name(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for tid, cpu in self._cpu.items():
            name = self._names.get(tid, "other")
            totals[name] = totals.get(name, 0.0) + cpu - self._start.get(tid, 0.0)
        return {name: round(cpu, 2) for name, cpu in sorted(totals.items(), key=lambda kv: -kv[1]) if cpu >= 0.01}


def _proc_status(field_name: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmHWM: its peak resident set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _import_quantization_stack() -> None:
    """What both quantizing scenarios import anyway (bitsandbytes alone takes seconds), done before the clock."""
    from streamq.bnb import bitsandbytes_functional

    bitsandbytes_functional()  # without bitsandbytes' 'pip install kernels' message, as streamq imports it
    import transformers.integrations.bitsandbytes  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def _read_sockets_in_larger_pieces() -> None:
    """What streamq.fetch does for its downloads (httpcore reads up to 1 MiB per socket read instead of
    64 KiB), done here without importing streamq, so that the raw run imports no torch."""
    import importlib

    for name in ("httpcore2._sync.http11", "httpcore._sync.http11"):
        try:
            connection = importlib.import_module(name).HTTP11Connection
        except (ImportError, AttributeError):
            continue
        if isinstance(getattr(connection, "READ_NUM_BYTES", None), int) and connection.READ_NUM_BYTES < 1 << 20:
            connection.READ_NUM_BYTES = 1 << 20


def _stream_source(endpoint: str, name: str, progress: Callable[[int], None] = lambda got: None, limit: int | None = None) -> int:
    """Download a source file as hf_hub_download does (its metadata request, then a GET of the location it
    names, with huggingface_hub's session, headers, timeout and status retries) but keep none of it: the
    bytes are counted and dropped, so a file of any size costs no disk. `progress(bytes so far)` after
    each piece; `limit`: only the first bytes, by Range. Sockets are read in 1 MiB pieces, as streamq
    reads them (`streamq.fetch`), so that neither side pays Python's bookkeeping per 64 KiB more than the other."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    _read_sockets_in_larger_pieces()
    meta = get_hf_file_metadata(hf_hub_url(SOURCE, name, endpoint=endpoint), token=TOKEN, endpoint=endpoint)
    headers = build_hf_headers(token=TOKEN)
    if limit is not None:
        headers["Range"] = f"bytes=0-{limit - 1}"
    got = 0
    with http_stream_backoff(
        "GET", meta.location, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, retry_on_exceptions=(),
        retry_on_status_codes=(408, 429),
    ) as response:
        hf_raise_for_status(response)
        for chunk in response.iter_bytes():
            got += len(chunk)
            progress(got)
    expected = min(limit, meta.size) if limit is not None else meta.size
    if got != expected:
        raise RuntimeError(f"{name}: {got} bytes arrived, {expected} expected")
    return got


def probe(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    """One download (the first `download_bytes` of the largest source file), then one upload (the largest
    output shard's size): the rates a lone transfer gets."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=p["endpoint"], token=TOKEN)
    _read_sockets_in_larger_pieces()  # and the imports it needs, before the clock
    name, size = p["input"]
    op = CommitOperationAdd("probe.bin", str(_random_file(area / "probe.bin", p["upload_bytes"])))
    api.create_repo(p["dst"])

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        got = _stream_source(p["endpoint"], name, limit=p.get("download_bytes"))
        down = time.perf_counter() - started
        started = time.perf_counter()
        api.preupload_lfs_files(p["dst"], additions=[op])
        return {"download_bytes_per_s": got / down, "upload_bytes_per_s": p["upload_bytes"] / (time.perf_counter() - started)}

    return work


def raw_transfer(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    """Stream each source file, in order, and drop its bytes; upload a random file of each output shard's
    size as soon as the stream has passed that shard's last source byte (one upload at a time, as
    streamq's publish thread), then one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=p["endpoint"], token=TOKEN)
    staging = Path(p["staging"])
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # before the clock starts; os.urandom releases the GIL
        payloads = list(pool.map(lambda output: _random_file(staging / output[0], output[1]), p["outputs"]))
    ready = [tuple(r) for r in p["ready"]]
    _read_sockets_in_larger_pieces()  # and the imports it needs, before the clock
    api.create_repo(p["dst"])

    def upload(path: Path) -> tuple[CommitOperationAdd, float]:
        op = CommitOperationAdd(path.name, str(path))
        started = time.perf_counter()
        api.preupload_lfs_files(p["dst"], additions=[op])
        return op, time.perf_counter() - started

    def work() -> dict[str, Any]:
        down: list[float] = []
        with ThreadPoolExecutor(1) as uploader:
            pending = []

            def submit_ready(position: tuple[int, int]) -> None:
                while len(pending) < len(payloads) and ready[len(pending)] <= position:
                    pending.append(uploader.submit(upload, payloads[len(pending)]))

            for index, name in enumerate(p["inputs"]):
                started = time.perf_counter()
                _stream_source(p["endpoint"], name, lambda got: submit_ready((index, got)))
                down.append(time.perf_counter() - started)
            submit_ready((len(p["inputs"]), 0))
            done = [f.result() for f in pending]
        api.create_commit(p["dst"], operations=[op for op, _ in done], commit_message="raw transfer")
        return {"download_s": down, "upload_s": [s for _, s in done]}

    return work


def _random_file(path: Path, size: int) -> Path:
    """Incompressible bytes, written in pieces so memory stays small."""
    path.parent.mkdir(parents=True, exist_ok=True)
    piece = 16 << 20
    with path.open("wb") as f:
        for start in range(0, size, piece):
            f.write(os.urandom(min(piece, size - start)))
    return path


def streamq_run(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    from streamq import stream_requantize

    _import_quantization_stack()

    options = {"max_shard_size": p["max_shard_size"]} if p.get("max_shard_size") else {}

    def work() -> dict[str, Any]:
        result = stream_requantize(
            SOURCE, p["dst"], endpoint=p["endpoint"], token=TOKEN, work_dir=p.get("work_dir") or area / "work",
            disk_budget=p.get("disk_budget"), progress=False, device=p["device"], **options, **p.get("quant", {}),
        )
        return {
            "bytes_in": result.bytes_in, "bytes_out": result.bytes_out, "device": result.device, "shards": result.shards,
            "shards_skipped": result.shards_skipped,
        }

    return work


def transformers_recipe(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    """The usual way: whole model through the HF cache into memory, quantized at load, saved, uploaded."""
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from streamq.pipeline import _resolve_device

    _import_quantization_stack()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    device_map = _resolve_device(p["device"])  # where streamq quantizes, by streamq's own rule

    def work() -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(SOURCE, quantization_config=quantization, device_map=device_map)
        model.save_pretrained(area / "save")
        del model
        api = HfApi(endpoint=p["endpoint"], token=TOKEN)
        api.create_repo(p["dst"])
        api.upload_folder(repo_id=p["dst"], folder_path=area / "save")
        return {"saved_bytes": directory_bytes(area / "save"), "device_map": device_map}

    return work


def llmcompressor_route(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    """llm-compressor's way to int4, in its own virtualenv: model_free_ptq from the Hub id (the whole repo
    into the HF cache first), saved, uploaded. Imports only what that venv has."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import preset_name_to_scheme
    from huggingface_hub import HfApi
    from llmcompressor import model_free_ptq

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = p["group_size"]
    versions = {m.__name__: m.__version__ for m in (llmcompressor, compressed_tensors, torch, transformers)}

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        model_free_ptq(SOURCE, area / "save", scheme=scheme, ignore=p["ignore"], device="cpu")
        quantize_s = time.perf_counter() - started
        api = HfApi(endpoint=p["endpoint"], token=TOKEN)
        api.create_repo(p["dst"])
        api.upload_folder(repo_id=p["dst"], folder_path=area / "save")
        return {"saved_bytes": directory_bytes(area / "save"), "fetch_and_quantize_s": quantize_s, "ignore": p["ignore"], "versions": versions}

    return work


def _run_tool(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run one tool to the end: (seconds, its peak RSS in bytes from wait4's ru_maxrss)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(output.decode(errors="replace")[-4000:])
        raise RuntimeError(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024


def llamacpp_route(p: dict[str, Any], area: Path) -> Callable[[], dict[str, Any]]:
    """llama.cpp's own way to a GGUF (as its tools/quantize/README.md and the gguf-my-repo Space do): the whole
    repo downloaded (snapshot_download), `convert_hf_to_gguf.py --outtype bf16` (or the type itself for the
    converter's own bf16/f16/q8_0), `llama-quantize BF16 OUT TYPE NTHREADS`, then the file uploaded. Each step
    timed; the download is deleted once converted and the bf16 file once quantized (the peak is the same).
    The converter comes from streamq's pinned tree ($STREAMQ_LLAMA_CPP), llama-quantize from $LLAMA_QUANTIZE."""
    from huggingface_hub import HfApi, snapshot_download

    from streamq.gguf.llama_cpp import converter_tree

    qtype = gguf_type(p["scenario"])
    script = converter_tree() / "convert_hf_to_gguf.py"
    quantize = os.environ.get("LLAMA_QUANTIZE", "llama-quantize")
    threads = os.cpu_count() or 1
    api = HfApi(endpoint=p["endpoint"], token=TOKEN)
    _read_sockets_in_larger_pieces()

    def work() -> dict[str, Any]:
        steps: dict[str, float] = {}
        peaks: dict[str, int] = {}
        started = time.perf_counter()
        # into a folder named as the repo: the converter names the model after the folder, streamq after the repo
        src = Path(snapshot_download(SOURCE, local_dir=area / SOURCE.split("/")[1], endpoint=p["endpoint"], token=TOKEN))
        steps["download_s"] = time.perf_counter() - started
        out = area / "out" / f"model-{qtype.upper()}.gguf"
        out.parent.mkdir()
        converter_type = qtype if qtype in ("bf16", "f16", "q8_0") else "bf16"
        first = out if converter_type == qtype else area / "model-BF16.gguf"
        steps["convert_s"], peaks["convert"] = _run_tool(
            [sys.executable, str(script), str(src), "--outtype", converter_type, "--outfile", str(first)],
            {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        shutil.rmtree(src)
        if first != out:
            steps["quantize_s"], peaks["quantize"] = _run_tool([quantize, str(first), str(out), qtype.upper(), str(threads)])
            first.unlink()
        started = time.perf_counter()
        api.create_repo(p["dst"])
        api.upload_file(path_or_fileobj=str(out), path_in_repo=out.name, repo_id=p["dst"])
        steps["upload_s"] = time.perf_counter() - started
        return {**steps, "tool_peak_rss": max(peaks.values()), "tool_peak_rss_by_step": peaks, "threads": threads,
                "output_bytes": out.stat().st_size}

    return work


# ---------------------------------------------------------------- the benchmark (parent)


@dataclass(frozen=True)
class Shapes:
    """What the targets are measured against: the source files and streamq's output shards, as its plan has them."""

    inputs: list[tuple[str, int]]
    outputs: list[tuple[str, int]]  # expected sizes (an upper bound: the header reserve is counted whole)
    ready: list[tuple[int, int]] = field(default_factory=list)  # per output: (source file, offset) of its last byte in the stream
    largest_tensor: int = 0  # bytes of the largest stored tensor: the window must hold it whole
    output_pair: int = 0  # two consecutive output shards: the output pool
    max_shard_size: int | None = None  # as given to streamq (None: its default)

    @property
    def largest_in(self) -> int:
        return max(size for _, size in self.inputs)

    @property
    def largest_out(self) -> int:
        return max(size for _, size in self.outputs)

    @property
    def default_budget(self) -> int:
        """streamq's default disk_budget: the largest tensor plus its 1 GB read-ahead, plus two output shards."""
        from streamq.budget import pools

        return sum(pools(self.largest_tensor, self.output_pair, True))


def shard_shapes(endpoint: str, max_shard_size: int | str | None = None, quant: dict[str, Any] | None = None) -> Shapes:
    """Input sizes from the Hub, output shards as streamq's plan cuts them (the raw run uploads files of
    these sizes, each once the stream has passed its last source byte). `quant`: the plan of those options
    (e.g. format="gguf", quant_type="q4_k_m") instead of the default nf4."""
    from streamq import plan_requantize

    plan = plan_requantize(SOURCE, endpoint=endpoint, token=TOKEN, **({"max_shard_size": max_shard_size} if max_shard_size else {}), **(quant or {}))
    layout = plan.layout
    ready = []
    for output in plan.outputs:
        parts = [plan.stored_at[part] for item in output.items for part in layout.parts[item]]
        ready.append(max((p.file, p.end) for p in parts))
    return Shapes(
        [(s.name, s.size) for s in plan.shards], [(o.name, o.expected_size) for o in plan.outputs], ready,
        plan.largest_tensor(), plan.output_pair(), plan.settings.max_shard_size if max_shard_size else None,
    )


@functools.cache
def int4_kept_modules(endpoint: str) -> list[str]:
    """What streamq's int4 keeps, in model_free_ptq's terms: the module of every kept `*.weight` (it would
    otherwise quantize every `.weight` not ending in "norm", embeddings included), as tests/int4_cases.py."""
    from streamq import plan_requantize

    plan = plan_requantize(SOURCE, endpoint=endpoint, token=TOKEN, quant_type="int4", blocksize=INT4_GROUP)
    return sorted(k.removesuffix(".weight") for k, r in plan.rules.items() if r.action == "keep" and k.endswith(".weight"))


OVERLAP_READ_AHEAD = 4 * GB  # overlap's read-ahead, against streamq's default of 1 GB


def scenario_params(scenario: str, shapes: Shapes, endpoint: str, scratch: Path, device: str, setup: Setup | None = None) -> dict[str, Any]:
    setup = setup or Setup()
    timed = setup.timeline and scenario != "llmcompressor"  # the timeline patches streamq, which the reference venv lacks
    params: dict[str, Any] = {"endpoint": endpoint, "dst": f"{OUTPUT_NAMESPACE}/{scenario}-{uuid.uuid4().hex[:8]}", "device": device, "timeline": timed}
    if scenario == "probe":
        params.update(input=max(shapes.inputs, key=lambda s: s[1]), upload_bytes=shapes.largest_out, download_bytes=setup.probe_bytes)
    if scenario == "raw":
        params.update(inputs=[n for n, _ in shapes.inputs], outputs=shapes.outputs, ready=shapes.ready, staging=str(scratch / "staging"))
    if scenario in ("strict", "overlap", "unchecked", "int4") or base_scenario(scenario) == "gguf":
        params["max_shard_size"] = shapes.max_shard_size
    if base_scenario(scenario) == "gguf":  # the default disk budget, sized from the GGUF plan
        params.update(quant={"format": "gguf", "quant_type": gguf_type(scenario)})
    if scenario in ("overlap", "unchecked"):
        params["disk_budget"] = shapes.largest_tensor + OVERLAP_READ_AHEAD + shapes.output_pair
    if scenario == "int4":  # the default disk budget: streamq sizes the output pool from int4's own plan
        params.update(quant={"quant_type": "int4", "blocksize": INT4_GROUP})
    if scenario == "llmcompressor":
        params.update(group_size=INT4_GROUP, ignore=int4_kept_modules(endpoint))
    return params


@dataclass(frozen=True)
class Setup:
    """How every scenario child runs: its cores (None: all) and streamq's device option; how much of the
    largest source file a calibration probe downloads (None: all of it)."""

    cpus: set[int] | None = None
    device: str = "auto"
    timeline: bool = False
    probe_bytes: int | None = 2 * GB


def split_run(name: str, default_device: str) -> tuple[str, str]:
    """A run's name is a scenario, or `scenario@device` to quantize on another device than --device."""
    scenario, _, device = name.partition("@")
    return scenario, device or default_device


def run_scenario(name: str, shapes: Shapes, endpoint: str, scratch: Path, setup: Setup = Setup()) -> Measurement:
    """One child run; the output repo and every local file are removed afterwards to keep the disk free."""
    from huggingface_hub import HfApi

    scenario, device = split_run(name, setup.device)
    params = scenario_params(scenario, shapes, endpoint, scratch, device, setup)
    area = scratch / params["dst"].split("/")[1]
    objects = source_objects(endpoint)
    served = SERVED.snapshot(objects)
    try:
        measured = replace(run_child(scenario, params, area, setup.cpus), scenario=name)
        measured.details["source_bytes_served"] = SERVED.since(served, objects)
        shards = output_shards(endpoint, params["dst"])
        measured.details["output_shard_bytes"] = {name: size for name, (size, _) in shards.items()}
        measured.details["output_shard_sha256"] = {name: sha for name, (_, sha) in shards.items()}
        return measured
    finally:
        shutil.rmtree(area, ignore_errors=True)
        shutil.rmtree(scratch / "staging", ignore_errors=True)
        HfApi(endpoint=endpoint, token=TOKEN).delete_repo(params["dst"], missing_ok=True)


def output_shards(endpoint: str, repo_id: str) -> dict[str, tuple[int, str | None]]:
    """The output repo's shards: name -> (size, sha256)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=TOKEN).model_info(repo_id, files_metadata=True)
    return {s.rfilename: (s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or [] if s.rfilename.endswith((".safetensors", ".gguf"))}


def probe_rates(hub: Any, network: Network | None, shapes: Shapes, scratch: Path, setup: Setup, tries: int = 2) -> dict[str, float]:
    """Best download and upload bytes/s of one largest shard under `network`, over `tries` probes."""
    use_network(hub, network)
    probes = [run_scenario("probe", shapes, hub.endpoint, scratch, setup).details for _ in range(tries)]
    return {key: max(p[key] for p in probes) for key in ("download_bytes_per_s", "upload_bytes_per_s")}


def calibrate(hub: Any, bandwidth: float, shapes: Shapes, scratch: Path, setup: Setup, rounds: int = 3) -> tuple[Network, list[dict[str, Any]]]:
    """Find the throttle settings under which a lone transfer runs within 10% of `bandwidth`, and check them.

    The emulator is a Python server on this machine: sending or receiving a byte costs it time on top of
    the throttle's waits, so a naive throttle runs below nominal. Each round adds the measured shortfall
    (seconds per byte) to the cost the waits leave room for, then probes again; an upload already sent
    without delay cannot gain from another round (the emulator's own speed is the limit), so it stops there.
    """
    network = Network(bandwidth)
    history = []
    for _ in range(rounds):
        rates = probe_rates(hub, network, shapes, scratch, setup)
        history.append({"network": asdict(network), **rates})
        down, up = rates["download_bytes_per_s"], rates["upload_bytes_per_s"]
        upload_unthrottled = network.upload_cost >= 1 / bandwidth  # no delay left to take off: the emulator is the limit
        if abs(down / bandwidth - 1) <= 0.1 and (abs(up / bandwidth - 1) <= 0.1 or upload_unthrottled):
            break
        network = Network(
            bandwidth,
            max(0.0, network.download_cost + 1 / down - 1 / bandwidth),
            max(0.0, network.upload_cost + 1 / up - 1 / bandwidth),
        )
    return network, history


def run_network(
    label: str, network: Network | None, hub: Any, shapes: Shapes, scratch: Path, repeat: int, scenarios: list[str], setup: Setup,
    save: Callable[[dict[str, Any]], None] = lambda partial: None,
) -> dict[str, Any]:
    """Every scenario `repeat` times, interleaved, under one network setting; best wall time counts.
    `save` gets the runs so far after each one."""
    use_network(hub, network)
    runs: dict[str, list[Measurement]] = {s: [] for s in scenarios}

    def as_json() -> dict[str, list[dict[str, Any]]]:
        return {s: [asdict(m) for m in ms] for s, ms in runs.items()}

    for round_ in range(repeat):
        for scenario in scenarios:
            measured = run_scenario(scenario, shapes, hub.endpoint, scratch, setup)
            runs[scenario].append(measured)
            save({"label": label, "partial": True, "runs": as_json()})
            print(f"  [{label} {round_ + 1}/{repeat}] {scenario:<12} wall {measured.wall_s:6.1f} s  "
                  f"disk {measured.peak_disk / GB:5.2f} GB  rss {measured.peak_rss / GB:5.2f} GB  cpu by thread "
                  f"{measured.details['thread_cpu_s']}", flush=True)
            if "timeline" in measured.details:
                print(timeline.render(measured.details["timeline"]), flush=True)
    use_network(hub, None)
    best = {s: summarize(ms) for s, ms in runs.items()}
    return {
        "label": label,
        "network": asdict(network) if network else None,
        "measured_rates": measured_rates(runs["raw"], shapes),
        "best": best,
        "runs": as_json(),
        "targets": targets(best, shapes),
    }


def summarize(runs: list[Measurement]) -> dict[str, float]:
    """Best (lowest) wall time; the highest peak disk and RSS seen, so a lucky run cannot hide a peak."""
    return {
        "wall_s": min(m.wall_s for m in runs),
        "peak_disk": max(m.peak_disk for m in runs),
        "peak_rss": max(m.peak_rss for m in runs),
        "rss_above_setup": max(m.peak_rss - m.details["rss_after_setup"] for m in runs),
        "cpu_s": min(m.cpu_s for m in runs),
    }


def measured_rates(raw_runs: list[Measurement], shapes: Shapes) -> dict[str, float]:
    """The emulator's real per-transfer speed, from the raw runs' fastest download and upload times."""
    down = sum(size for _, size in shapes.inputs) / min(sum(m.details["download_s"]) for m in raw_runs)
    up = sum(size for _, size in shapes.outputs) / min(sum(m.details["upload_s"]) for m in raw_runs)
    return {"download_bytes_per_s": down, "upload_bytes_per_s": up}


def targets(best: dict[str, dict[str, float]], shapes: Shapes) -> dict[str, dict[str, Any]]:
    """The targets below for each device named in the runs (`strict@cpu`...), against the same raw run."""
    found = {}
    for device in sorted({split_run(name, "")[1] for name in best}):
        view = {scenario: row for name, row in best.items() for scenario, d in [split_run(name, "")] if d == device or scenario == "raw"}
        tag = f" [{device}]" if device else ""
        found.update({f"{name}{tag}": t for name, t in device_targets(view, shapes).items()})
    return found


def device_targets(best: dict[str, dict[str, float]], shapes: Shapes) -> dict[str, dict[str, Any]]:
    """The issue's targets that the scenarios run can show, each with the measured value and whether it holds.

    Disk: strict runs with streamq's default disk_budget (the largest tensor, 1 GB of read-ahead, two
    output shards), overlap with 4 GB of read-ahead; work_dir must stay within it whatever the source
    files' sizes. RSS: about one tensor and one output shard beside the imports, never a source file."""
    overlap_budget = shapes.largest_tensor + OVERLAP_READ_AHEAD + shapes.output_pair
    rss_limit = shapes.largest_tensor + shapes.largest_out + GB
    streamq_rss = max((best[s]["peak_rss"] for s in ("strict", "overlap") if s in best), default=None)

    def target(value: float, limit: float, at_most: bool) -> dict[str, Any]:
        return {"value": value, "limit": limit, "met": value <= limit if at_most else value >= limit}

    def ran(*names: str) -> bool:
        return all(name in best for name in names)

    found = {}
    for name in ("strict", "overlap"):
        if ran("raw", name):
            found[f"{name} wall / raw wall <= 1.15"] = target(best[name]["wall_s"] / best["raw"]["wall_s"], 1.15, True)
    if ran("strict", "overlap"):
        found["overlap speed-up over strict"] = target(best["strict"]["wall_s"] / best["overlap"]["wall_s"], 1.0, False)
    if ran("strict"):
        found["strict peak disk <= the default disk_budget"] = target(best["strict"]["peak_disk"], shapes.default_budget + METADATA_ALLOWANCE, True)
    if ran("overlap"):
        found["overlap peak disk <= its disk_budget"] = target(best["overlap"]["peak_disk"], overlap_budget + METADATA_ALLOWANCE, True)
    if streamq_rss is not None:
        found["streamq peak RSS <= largest tensor + largest output shard + 1 GB"] = target(streamq_rss, rss_limit, True)
    if ran("recipe", "strict"):
        found["recipe / strict peak disk >= 5"] = target(best["recipe"]["peak_disk"] / best["strict"]["peak_disk"], 5, False)
    if ran("recipe") and streamq_rss is not None:
        found["recipe / streamq peak RSS >= 5"] = target(best["recipe"]["peak_rss"] / streamq_rss, 5, False)
    if ran("int4", "llmcompressor"):  # issue 21: keep streamq's lead over llm-compressor's route for int4
        for what, key in (("wall", "wall_s"), ("peak disk", "peak_disk"), ("peak RSS", "peak_rss")):
            found[f"llmcompressor / int4 {what} >= 1"] = target(best["llmcompressor"][key] / best["int4"][key], 1.0, False)
    return found


# ---------------------------------------------------------------- kill -9 and resume


def _vm_hwm(pid: int) -> int:
    """A live child's peak resident set (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _output_record(endpoint: str, repo_id: str, work: Path) -> dict[str, Any]:
    """What a killed run left: the output's committed manifest (shards, pending ones, hash checkpoints) and
    the upload journal in its work_dir."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    from streamq.journal import JOURNAL_NAME
    from streamq.location import HubRepo
    from streamq.manifest import MANIFEST_NAME
    from streamq.workdir import folder_for

    record: dict[str, Any] = {"committed": [], "pending": [], "checkpoints": {}, "journal": []}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = json.loads(Path(hf_hub_download(repo_id, MANIFEST_NAME, local_dir=tmp, endpoint=endpoint, token=TOKEN)).read_text())
        except (EntryNotFoundError, RepositoryNotFoundError):
            manifest = None
    if manifest is not None:
        record.update(
            committed=sorted(manifest["shards"]), pending=sorted(manifest["pending"]), verified=sorted(manifest["verified"]),
            checkpoints={name: point["offset"] for name, point in manifest["checkpoints"].items()},
        )
    journal = folder_for(work, HubRepo(repo_id), endpoint) / JOURNAL_NAME  # the output's folder under its work_dir
    if journal.is_file():
        data = json.loads(journal.read_text())
        record["journal"] = sorted(data.get("shards", {}))
        record["journal_checkpoints"] = {name: point["offset"] for name, point in data.get("checkpoints", {}).items()}
    return record


def kill_and_resume(
    hub: Any, shapes: Shapes, scratch: Path, setup: Setup, mode: str, fraction: float, reference: dict[str, str] | None,
) -> dict[str, Any]:
    """streamq (strict's settings) killed with SIGKILL once the emulator has sent `fraction` of the largest
    source file, then the same command again to the same output, with the same work_dir (`mode` "kept")
    or a new one ("fresh"). Returns what each run did, what the second downloaded again (bytes the
    emulator sent of each source file during it) and how many output shards it made again or skipped;
    the finished output's shards are compared with `reference` (an uninterrupted run's sha256s)."""
    from huggingface_hub import HfApi

    objects = source_objects(hub.endpoint)
    name, size = max(shapes.inputs, key=lambda s: s[1])
    _, device = split_run("strict", setup.device)
    params = scenario_params("strict", shapes, hub.endpoint, scratch, device, setup)
    params["dst"] = f"{OUTPUT_NAMESPACE}/kill-{mode}-{uuid.uuid4().hex[:8]}"
    first = scratch / f"kill-{mode}-1"
    work = first / "work"
    params["work_dir"] = str(work)
    sizes = dict(shapes.inputs)
    try:
        before = SERVED.snapshot(objects)
        started = time.monotonic()
        peak_disk = peak_rss = 0
        proc, _ = start_child("strict", params, first, setup.cpus)
        sent = 0
        while True:
            sent = SERVED.since(before, objects)[name]
            peak_disk, peak_rss = max(peak_disk, directory_bytes(first)), max(peak_rss, _vm_hwm(proc.pid))
            if sent >= fraction * size:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the run to be killed ended by itself (exit code {proc.returncode}) after {sent} bytes of {name}")
            time.sleep(POLL_SECONDS)
        killed_after = time.monotonic() - started
        proc.wait()
        time.sleep(0.5)  # the emulator's last pieces to the dead connection
        run1 = {
            "killed_after_s": round(killed_after, 2), "killed_at_bytes_of_largest": sent,
            "source_bytes_served": SERVED.since(before, objects), "peak_disk_polled": peak_disk, "peak_rss_polled": peak_rss,
            "work_dir_bytes_left": directory_bytes(work), **_output_record(hub.endpoint, params["dst"], work),
        }
        recorded = set(run1["committed"]) | set(run1["pending"]) | set(run1["journal"] if mode == "kept" else [])
        second = scratch / f"kill-{mode}-2"
        if mode == "fresh":
            params["work_dir"] = str(second / "work")
        before = SERVED.snapshot(objects)
        measured = run_child("strict", params, second, setup.cpus, watch=first if mode == "kept" else second)
        served = SERVED.since(before, objects)
        shards = output_shards(hub.endpoint, params["dst"])
        details = measured.details
        made_again = details["shards"] - details["shards_skipped"]
        points = {**run1["checkpoints"], **(run1.get("journal_checkpoints", {}) if mode == "kept" else {})}
        checkpoint = points.get(name, 0)
        # what a resumed run must download at least: every file not checked yet, from its saved hash state on
        least = sum(0 if n in run1.get("verified", []) else s - points.get(n, 0) for n, s in shapes.inputs)
        run2 = {
            "wall_s": measured.wall_s, "peak_disk": measured.peak_disk, "peak_rss": measured.peak_rss, "cpu_s": measured.cpu_s,
            "source_bytes_served": served,
            "served_over_size": {n: round(served[n] / sizes[n], 4) for n in sizes},
            "served_total": sum(served.values()), "source_total": sum(sizes.values()),
            "least_to_download": least,  # from the hash checkpoint of the killed file on, and every file after it
            "shards": details["shards"], "shards_skipped": details["shards_skipped"], "shards_made_again": made_again,
            "recorded_by_run1": len(recorded),
            "uploaded_by_run1_but_made_again": len(recorded) - details["shards_skipped"],
            "thread_cpu_s": details.get("thread_cpu_s"),
        }
        same = None if reference is None else {n: sha for n, (_, sha) in shards.items()} == reference
        print(f"  [kill -9, {mode} work_dir] run 1 killed after {killed_after:.1f} s at {sent / GB:.2f} of {size / GB:.2f} GB of {name} "
              f"({len(run1['committed'])} shards committed, {len(run1['pending'])} pending, {len(run1['journal'])} in the journal, "
              f"checkpoint of {name} at {checkpoint / GB:.2f} GB); run 2: {measured.wall_s:.1f} s, downloaded "
              f"{', '.join(f'{served[n] / GB:.2f}/{sizes[n] / GB:.2f} GB' for n in sizes)} (least {least / GB:.2f} GB), "
              f"made {made_again} of {details['shards']} shards again, skipped {details['shards_skipped']}; "
              f"disk {measured.peak_disk / GB:.2f} GB, rss {measured.peak_rss / GB:.2f} GB; output same as uninterrupted: {same}", flush=True)
        return {"mode": mode, "kill_fraction": fraction, "killed_file": name, "killed_file_bytes": size, "run1": run1, "run2": run2,
                "output_same_as_uninterrupted": same}
    finally:
        for area in (first, scratch / f"kill-{mode}-2"):
            shutil.rmtree(area, ignore_errors=True)
        HfApi(endpoint=hub.endpoint, token=TOKEN).delete_repo(params["dst"], missing_ok=True)


# ---------------------------------------------------------------- report


def print_network(result: dict[str, Any]) -> None:
    rates = result["measured_rates"]
    print(f"\n== {result['label']}: measured per transfer in the raw run: download "
          f"{rates['download_bytes_per_s'] / MB:.0f} MB/s, upload {rates['upload_bytes_per_s'] / MB:.0f} MB/s")
    raw = result["best"]["raw"]
    print(f"{'scenario':<13} {'wall s':>7} {'x raw':>6} {'disk GB':>8} {'x raw':>6} {'RSS GB':>7} {'x raw':>6} "
          f"{'RSS-imports':>11} {'CPU s':>7}")
    for name, row in result["best"].items():
        print(f"{name:<13} {row['wall_s']:7.1f} {row['wall_s'] / raw['wall_s']:6.2f} {row['peak_disk'] / GB:8.2f} "
              f"{row['peak_disk'] / raw['peak_disk'] if raw['peak_disk'] >= MB else float('nan'):6.2f} {row['peak_rss'] / GB:7.2f} "
              f"{row['peak_rss'] / raw['peak_rss']:6.2f} {row['rss_above_setup'] / GB:11.2f} {row['cpu_s']:7.1f}")
    if result["network"]:
        print("  (the throttle is per connection: transformers fetches the shards over up to 8 at once and upload_folder "
              "sends up to 5, so recipe's and llmcompressor's wall times here are optimistic)")
    for name, t in result["targets"].items():
        value, limit = t["value"], t["limit"]
        shown = f"{value / MB:.1f} MB (limit {limit / MB:.1f} MB)" if limit > 100 else f"{value:.2f} (limit {limit:.2f})"
        print(f"  {'MET ' if t['met'] else 'MISS'} {name}: {shown}")


def print_calibration(bandwidth: float, history: list[dict[str, Any]]) -> None:
    """The check that the throttle really holds a lone transfer near the nominal bandwidth."""
    for round_, rates in enumerate(history, 1):
        print(f"throttle calibration {round_} at {bandwidth / MB:g} MB/s nominal, one transfer alone: "
              f"download {rates['download_bytes_per_s'] / MB:.0f} MB/s, upload {rates['upload_bytes_per_s'] / MB:.0f} MB/s")


def machine_facts() -> dict[str, Any]:
    from streamq.bnb import bitsandbytes_functional

    bitsandbytes_functional()
    import bitsandbytes
    import huggingface_hub
    import safetensors
    import torch
    import transformers

    return {
        "cores": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, huggingface_hub, bitsandbytes, safetensors)},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), None),
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    if "STREAMQ_BENCH_COMMIT" in os.environ:  # a copy without its .git (the device machine): say which commit it is
        return {"commit": os.environ["STREAMQ_BENCH_COMMIT"], "dirty": False}
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=ModelSpec.hidden)
    parser.add_argument("--intermediate", type=int, default=ModelSpec.intermediate)
    parser.add_argument("--layers", type=int, default=ModelSpec.layers)
    parser.add_argument("--vocab", type=int, default=ModelSpec.vocab)
    parser.add_argument("--heads", type=int, default=ModelSpec.heads)
    parser.add_argument("--kv-heads", type=int, default=ModelSpec.kv_heads)
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    parser.add_argument("--tie-embeddings", action="store_true", help="store no lm_head (tied to the embedding, as Gemma does)")
    parser.add_argument("--shard-mb", type=int, default=ModelSpec.shard_bytes // MB)
    parser.add_argument("--fp8-moe", action="store_true", help="a DeepSeek-shaped block-FP8 MoE source (fp8_source.py) instead of bf16 Llama")
    parser.add_argument("--experts", type=int, default=MoESpec.experts, help="--fp8-moe: routed experts per MoE layer")
    parser.add_argument("--moe-intermediate", type=int, default=MoESpec.moe_intermediate, help="--fp8-moe: each expert's MLP width")
    parser.add_argument("--bandwidth-mbps", type=lambda v: [float(x) for x in v.split(",")], default=[200.0],
                        help="MB/s per transfer, each direction; several, comma-separated, run one after the other")
    parser.add_argument("--calibration-rounds", type=int, default=3,
                        help="throttle calibration rounds at most (two probes each, every probe one largest shard each way)")
    parser.add_argument("--unthrottled", action=argparse.BooleanOptionalAction, default=True,
                        help="also run every scenario on the unthrottled loopback")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario and network; best wall time counts")
    parser.add_argument("--scenarios", type=lambda v: v.split(","), default=list(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS + ABLATIONS)}; a quantizing one may name its "
                             f"device, overriding --device: strict@cuda,strict@cpu")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="streamq's device option")
    parser.add_argument("--child-cpus", type=int, default=None,
                        help="pin each scenario to this many cores and the emulator to the rest (a small VM on a big box)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the hub and work areas live (default: /tmp)")
    parser.add_argument("--hub-dir", type=Path, default=None,
                        help="keep the emulator's repos here instead (a RAM-backed tmpfs, say), across invocations: "
                             "a source built there from the same model and seed is used again")
    parser.add_argument("--source-direct", action="store_true",
                        help="write the source straight into the emulator's storage instead of uploading it through the emulator")
    parser.add_argument("--sparse", action="store_true",
                        help="with --source-direct: each source file is its header and a hole (zeros), costing no disk or RAM; "
                             "its sha256 comes from sparse_sha256.json when listed there")
    parser.add_argument("--max-shard-size", default=None,
                        help="streamq's max_shard_size for its output shards (\"1GB\", \"200MB\", or bytes; default: streamq's own)")
    parser.add_argument("--probe-mb", type=int, default=2000,
                        help="MB of the largest source file each calibration probe downloads (0: all of it)")
    parser.add_argument("--kill-resume", type=lambda v: [m for m in v.split(",") if m], default=[],
                        help="after the scenarios, kill -9 streamq in the middle of the largest source file and run it again, "
                             "with the same work_dir (kept) and/or a new one (fresh): kept,fresh")
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="--kill-resume: kill once this fraction of the largest source file has been sent")
    parser.add_argument("--kill-json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "kill_resume.json")
    parser.add_argument("--timeline", action="store_true", help="print when each stage of each run started and ended, by thread")
    parser.add_argument("--shapes-from", default=None,
                        help="gguf_TYPE: the raw run uploads the GGUF plan's files of TYPE (and the source gets a tokenizer), not nf4's shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "pipeline.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


SOURCE_MARK = "bench-source.json"  # in the hub's root: the model and seed its source repo was built from


def publish_model(
    hub: Any, spec: ModelSpec | MoESpec, seed: int, scratch: Path, direct: bool, sparse: bool = False, max_shard_size: int | str | None = None,
    tokenizer: bool = False, quant: dict[str, Any] | None = None,
) -> tuple[Shapes, dict[str, Any]]:
    """Put the source model on the emulator, unthrottled, keeping no other copy of it; a source already
    there from the same model and seed (a kept --hub-dir) is used as it is."""
    from huggingface_hub import HfApi

    started = time.monotonic()
    mark, wanted = hub.root / SOURCE_MARK, {"model": asdict(spec), "seed": seed, **({"sparse": True} if sparse else {}), **({"tokenizer": True} if tokenizer else {})}
    facts: dict[str, Any] = {}
    if mark.is_file() and json.loads(mark.read_text()) == wanted:
        how = "reused"
    else:
        mark.unlink(missing_ok=True)
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.delete_repo(SOURCE, missing_ok=True)
        if direct:
            facts = write_source_direct(hub.root, spec, seed, sparse, tokenizer)
            how = "written sparse into the emulator's storage" if sparse else "written into the emulator's storage"
        else:
            _builder(spec)(spec, scratch / "src", seed)
            if tokenizer:
                add_tokenizer(scratch / "src")
            api.create_repo(SOURCE)
            api.upload_folder(repo_id=SOURCE, folder_path=scratch / "src")
            shutil.rmtree(scratch / "src")
            how = "uploaded"
        mark.write_text(json.dumps(wanted))  # only once the source is whole
    seconds = time.monotonic() - started
    shapes = shard_shapes(hub.endpoint, max_shard_size, quant)
    print(f"model: {len(shapes.inputs)} source files ({', '.join(f'{s / GB:.2f}' for _, s in shapes.inputs)} GB), "
          f"{sum(s for _, s in shapes.inputs) / GB:.2f} GB {'fp8' if isinstance(spec, MoESpec) else 'bf16'} -> "
          f"{len(shapes.outputs)} output shards, {sum(s for _, s in shapes.outputs) / GB:.2f} GB {(quant or {}).get('quant_type', 'nf4')} (at most); largest tensor "
          f"{shapes.largest_tensor / GB:.2f} GB; default disk budget {shapes.default_budget / GB:.2f} GB "
          f"(source {how} in {seconds:.0f} s)", flush=True)
    return shapes, {"source": how, "seconds": round(seconds, 1), **facts}


def _builder(spec: ModelSpec | MoESpec) -> Callable[[Any, Path, int], None]:
    return build_fp8_model if isinstance(spec, MoESpec) else build_model


def add_tokenizer(folder: Path) -> None:
    """The small trained BPE tokenizer of tests/gguf_cases.py (tokenizer.json and its config), which llama.cpp's
    converter reads for Llama (it pads the vocabulary up to the config's vocab_size)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from gguf_cases import write_tokenizer

    write_tokenizer(folder, spm=False)


def write_source_direct(root: Path, spec: ModelSpec | MoESpec, seed: int, sparse: bool = False, tokenizer: bool = False) -> dict[str, Any]:
    """Build the model inside the emulator's storage and commit it there, as upload_folder would have:
    pushing 61 GB through the emulator's HTTP uploads takes minutes, a rename takes nothing.

    `sparse`: each shard is its safetensors header followed by a hole as long as its data (truncate), so
    its tensors read as zeros and the file takes neither disk nor RAM, however large; the emulator
    serves it like any file. Only the sha256 must read the zeros (or come from SPARSE_DIGESTS)."""
    from streamq.testing.auth import DEFAULT_USER
    from streamq.testing.storage import Entry, Put, RepoStore

    repo = RepoStore(root).create("model", SOURCE, private=False)
    assert repo is not None, "publish_model deleted the source repo first"
    staging = repo.tmp_file()  # on the objects' file system: a shard enters the store by a rename
    facts: dict[str, Any] = {}

    def stored(path: Path, sha256: str | None = None) -> Put:
        if path.suffix != ".safetensors":  # config.json and the index: regular files
            return Put(path.name, repo.add_bytes(path.read_bytes()))
        if sha256 is None:  # LFS under the default .gitattributes, as preupload would answer
            with path.open("rb") as f:
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        entry = Entry.large(sha256, path.stat().st_size)
        repo.adopt(path, sha256)
        return Put(path.name, entry)

    if sparse:
        if not isinstance(spec, ModelSpec):
            raise SystemExit("--sparse builds the bf16 Llama-shaped model only (not --fp8-moe)")
        staging.mkdir(parents=True)
        llama_config(spec).save_pretrained(staging)
        if tokenizer:
            add_tokenizer(staging)
        groups = spec.shards()
        files, weight_map = [], {}
        for number, group in enumerate(groups, 1):
            name = shard_name(number, len(groups))
            prefix, data = sparse_prefix(group)
            with (staging / name).open("wb") as f:
                f.write(prefix)
                f.truncate(len(prefix) + data)  # the data: a hole
            files.append((prefix, data))
            weight_map.update(dict.fromkeys((key for key, _ in group), name))
        total = sum(data for _, data in files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        started = time.monotonic()
        digests, computed = sparse_digests(files)
        facts = {"sparse": True, "sha256_computed": computed, "sha256_seconds": round(time.monotonic() - started, 1)}
        names = [shard_name(n, len(groups)) for n in range(1, len(groups) + 1)]
        operations = [stored(staging / name, digest) for name, digest in zip(names, digests)]
        operations += [stored(path) for path in sorted(staging.iterdir()) if path.suffix != ".safetensors"]
    else:
        _builder(spec)(spec, staging, seed)
        if tokenizer:
            add_tokenizer(staging)
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # hashing releases the GIL
            operations = list(pool.map(stored, sorted(staging.iterdir())))
    repo.commit_changes("main", operations, title="Upload folder using huggingface_hub", message="", author=DEFAULT_USER)
    shutil.rmtree(staging)
    return facts


def remove_outputs(root: Path) -> None:
    """Output repos a killed run left in a kept --hub-dir: they would hold tmpfs space the next run needs."""
    from streamq.testing.storage import RepoStore

    store = RepoStore(root)
    for repo in sorted((root / "repos" / "models" / OUTPUT_NAMESPACE).glob("*")):
        store.delete("model", f"{OUTPUT_NAMESPACE}/{repo.name}")


def run_all(
    hub: Any, shapes: Shapes, scratch: Path, args: argparse.Namespace, setup: Setup, save: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Each throttled bandwidth (calibrated first), then the bare loopback if asked; `save` gets the
    results after every run (the one in progress marked partial), so a run cut off keeps what it measured."""
    results: list[dict[str, Any]] = []
    network: Network | None = None  # the setting in progress, for the partial saves
    calibration: list[dict[str, Any]] | None = None

    def save_partial(partial: dict[str, Any]) -> None:
        save([*results, {**partial, "network": asdict(network) if network else None, "calibration": calibration}])

    for mbps in args.bandwidth_mbps:
        network, calibration = calibrate(hub, mbps * MB, shapes, scratch, setup, args.calibration_rounds)
        print_calibration(mbps * MB, calibration)
        label = f"throttled {mbps:g} MB/s"
        measured = run_network(label, network, hub, shapes, scratch, args.repeat, args.scenarios, setup, save_partial)
        results.append({**measured, "calibration": calibration})
    if args.unthrottled:
        network, calibration = None, None
        results.append(run_network("unthrottled loopback", None, hub, shapes, scratch, args.repeat, args.scenarios, setup, save_partial))
    save(results)
    return results


def pin(child_cpus: int | None, device: str) -> Setup:
    """Scenario cores and emulator cores apart, when asked (this process runs the emulator's threads)."""
    if child_cpus is None:
        return Setup(None, device)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= child_cpus:
        raise SystemExit(f"--child-cpus {child_cpus} leaves no core for the emulator on this {len(cores)}-core machine")
    os.sched_setaffinity(0, set(cores[child_cpus:]))
    return Setup(set(cores[:child_cpus]), device)


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    from streamq.testing import LocalHub

    if any(mode not in ("kept", "fresh") for mode in args.kill_resume):
        raise SystemExit("--kill-resume: kept, fresh or both (kept,fresh)")
    if args.sparse and not args.source_direct:
        raise SystemExit("--sparse writes the source into the emulator's storage: add --source-direct")
    runs = [split_run(name, args.device) for name in args.scenarios]
    if "raw" not in args.scenarios or any(base_scenario(s) not in SCENARIOS + ABLATIONS + GGUF_ROUTES or d not in DEVICES for s, d in runs):
        raise SystemExit(f"--scenarios: a subset of {','.join(SCENARIOS + ABLATIONS)} that includes raw (the baseline), "
                         f"each but raw optionally @{'/@'.join(DEVICES)}")
    for scenario, _ in runs:
        child_python(scenario)  # refused now rather than after the source is built
    setup = replace(  # pinned before the emulator starts
        pin(args.child_cpus, args.device), timeline=args.timeline, probe_bytes=args.probe_mb * MB if args.probe_mb else None,
    )
    spec: ModelSpec | MoESpec = ModelSpec(
        args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads, args.shard_mb * MB,
        args.head_dim, args.tie_embeddings,
    )
    if args.fp8_moe:
        if any(s == "recipe" for s, _ in runs):
            raise SystemExit("--fp8-moe: leave out the recipe scenario (transformers 5.25 cannot dequantize partial FP8 blocks)")
        spec = MoESpec(
            hidden=args.hidden, intermediate=args.intermediate, moe_intermediate=args.moe_intermediate, experts=args.experts,
            layers=args.layers, heads=args.heads, vocab=args.vocab, shard_bytes=args.shard_mb * MB,
        )
    scratch = Path(tempfile.mkdtemp(prefix="streamq-bench-", dir=args.scratch))
    hub_root = args.hub_dir or scratch / "hub"
    if args.hub_dir:
        remove_outputs(hub_root)
    load_before, git_before = os.getloadavg(), git_commit()

    def save(results: list[dict[str, Any]]) -> None:
        report = {
            "git": {**git_before, "changed_during_run": git_commit() != git_before}, "machine": {**machine_facts(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "model": {"kind": "fp8-moe" if args.fp8_moe else "bf16", **asdict(spec)}, "shards": asdict(shapes), "source": source, "repeat": args.repeat,
            "setup": {"child_cpus": sorted(setup.cpus) if setup.cpus else None, "device": setup.device}, "networks": results,
            "shapes_from": args.shapes_from or "nf4",
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))

    kills: list[dict[str, Any]] = []

    def save_kills() -> None:
        report = {
            "git": git_before, "machine": machine_facts(), "model": {"kind": "bf16", **asdict(spec)}, "shards": asdict(shapes),
            "source": source, "network": network, "setup": {"child_cpus": sorted(setup.cpus) if setup.cpus else None, "device": setup.device},
            "runs": kills,
        }
        args.kill_json.parent.mkdir(parents=True, exist_ok=True)
        args.kill_json.write_text(json.dumps(report, indent=2))

    try:
        with LocalHub(hub_root) as hub:
            SERVED.hub = hub
            gguf = any(base_scenario(s) in GGUF_ROUTES for s, _ in runs)
            quant = {"format": "gguf", "quant_type": gguf_type(args.shapes_from)} if args.shapes_from else None
            shapes, source = publish_model(hub, spec, args.seed, scratch, args.source_direct, args.sparse, args.max_shard_size, gguf, quant)
            results = run_all(hub, shapes, scratch, args, setup, save)
            for result in results:
                print_network(result)
            print(f"\nwritten {args.json}", flush=True)
            if args.kill_resume:  # under the first network measured (the calibrated throttle)
                network = results[0]["network"]
                use_network(hub, Network(**network) if network else None)
                strict = results[0]["runs"].get("strict")
                reference = strict[0]["details"]["output_shard_sha256"] if strict else None
                for mode in args.kill_resume:
                    kills.append(kill_and_resume(hub, shapes, scratch, setup, mode, args.kill_at, reference))
                    save_kills()
                print(f"written {args.kill_json}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
