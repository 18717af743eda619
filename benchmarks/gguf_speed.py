"""Issue 27: how fast streamq writes GGUF per weight, against llama.cpp's own route, on this machine's CPUs.

One synthetic Llama checkpoint with real dims (default hidden 4096, intermediate 14336, 32/8 heads; --layers
of them; a small trained BPE tokenizer from tests/gguf_cases.py, so the embedding is tiny), random bf16
weights (transformers' init, norms random too), saved as safetensors. For each type (q8_0, q4_0, q4_k_m):

  streamq   stream_requantize(SRC_DIR, OUT_DIR, format="gguf", quant_type=TYPE, progress=False): one pass,
            local dir to local dir (its ggml quantizer runs on os.cpu_count() threads);
  llama.cpp in the GGUF reference virtualenv (tests/gguf_reference_setup.sh), each step timed on its own:
            q8_0:        convert_hf_to_gguf.py SRC --outtype q8_0 (the converter quantizes itself, in numpy);
            q4_0/q4_k_m: convert_hf_to_gguf.py SRC --outtype bf16, then `llama-quantize BF16 OUT TYPE NTHREADS`
            with NTHREADS = os.cpu_count(), the thread count streamq uses.

Each is run --repeat times (interleaved), the best wall counts (other jobs may share the CPUs); the page cache
is warm for both (the source is read once before the clock). The outputs are compared byte for byte.

    STREAMQ_GGUF_REFERENCE=/work/gguf-ref-venv/bin/python \
        python benchmarks/gguf_speed.py --layers 2 --json benchmarks/results/gguf_speed_cpu2.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

TYPES = ("q8_0", "q4_0", "q4_k_m")
CONVERTER_TYPES = {"q8_0"}  # what llama.cpp's route writes with the converter alone (as tests/gguf_reference.py)


def reference_tools(python: str) -> tuple[Path, Path]:
    """The converter script and llama-quantize of the reference venv (as tests/gguf_reference.py finds them)."""
    prefix = Path(python).absolute().parent.parent  # the venv, not where its python links to
    scripts = sorted(prefix.glob("src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not scripts:
        raise SystemExit(f"no convert_hf_to_gguf.py under {prefix}/src")
    return scripts[-1], prefix / "llama.cpp-build" / "bin" / "llama-quantize"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall


def streamq_once(src: Path, out: Path, qtype: str) -> tuple[float, list[Path]]:
    """In a fresh interpreter (imports before the clock), so every run starts alike."""
    code = (
        "import sys, time, json\n"
        "from streamq import stream_requantize\n"
        "import streamq.gguf.stream, streamq.gguf.quantize\n"
        "from streamq.gguf.llama_cpp import converter, libraries\n"
        "converter(); libraries()\n"
        "t = time.perf_counter()\n"
        "stream_requantize(sys.argv[1], sys.argv[2], format='gguf', quant_type=sys.argv[3], progress=False)\n"
        "print(json.dumps({'wall_s': time.perf_counter() - t}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), qtype], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"streamq {qtype} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])["wall_s"], sorted(out.glob("*.gguf"))


def llamacpp_once(python: str, src: Path, work: Path, qtype: str, threads: int) -> tuple[dict[str, float], Path]:
    convert, quantize = reference_tools(python)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    out = work / f"llamacpp-{qtype}.gguf"
    if qtype in CONVERTER_TYPES:
        return {"convert_s": timed([python, str(convert), str(src), "--outtype", qtype, "--outfile", str(out)], env)}, out
    intermediate = work / "intermediate-bf16.gguf"
    steps = {"convert_s": timed([python, str(convert), str(src), "--outtype", "bf16", "--outfile", str(intermediate)], env)}
    steps["quantize_s"] = timed([str(quantize), str(intermediate), str(out), qtype.upper(), str(threads)])
    intermediate.unlink()
    return steps, out


def count_params(src: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def machine_facts() -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    return {
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, numpy)},
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), None),
        "cpu_flags_avx": sorted({f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                                 for f in line.split(":", 1)[1].split() if f.startswith(("avx", "f16c", "fma"))}),
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--types", type=lambda v: v.split(","), default=list(TYPES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--reference", default=os.environ.get("STREAMQ_GGUF_REFERENCE", "/work/gguf-ref-venv/bin/python"))
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gguf_speed.json")
    args = parser.parse_args()
    from gguf_cases import make_checkpoint

    threads = os.cpu_count() or 1
    commit = git_commit()
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="gguf-speed-") as tmp:
        tmp = Path(tmp)
        shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads)
        started = time.perf_counter()
        src = make_checkpoint(tmp / "src", "llama", shape=shape, max_shard_size="5GB")
        print(f"checkpoint: {shape} in {time.perf_counter() - started:.0f} s", flush=True)
        params = count_params(src)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"  {params / 1e6:.1f} M params, {src_bytes / 1e9:.2f} GB bf16", flush=True)
        for f in src.glob("*.safetensors"):  # warm the page cache for both routes alike
            f.read_bytes()
        results: dict[str, Any] = {}
        for qtype in args.types:
            runs: dict[str, list[dict[str, float]]] = {"streamq": [], "llamacpp": []}
            same: list[bool] = []
            for round_ in range(args.repeat):
                ours_dir = tmp / f"streamq-{qtype}"
                wall, ours = streamq_once(src, ours_dir, qtype)
                runs["streamq"].append({"wall_s": wall})
                steps, theirs = llamacpp_once(args.reference, src, tmp, qtype, threads)
                steps["wall_s"] = sum(steps.values())
                runs["llamacpp"].append(steps)
                same.append(len(ours) == 1 and filecmp.cmp(ours[0], theirs, shallow=False))
                out_bytes = theirs.stat().st_size
                print(f"  [{qtype} {round_ + 1}/{args.repeat}] streamq {wall:6.1f} s   llama.cpp "
                      + "  ".join(f"{k} {v:6.1f} s" for k, v in steps.items()) + f"   identical {same[-1]}", flush=True)
                for p in ours_dir.iterdir():
                    p.unlink()
                ours_dir.rmdir()
                theirs.unlink()
            best = {route: {key: min(r[key] for r in rs) for key in rs[0]} for route, rs in runs.items()}
            for route in best:
                best[route]["params_per_s"] = params / best[route]["wall_s"]
                for step in ("convert_s", "quantize_s"):
                    if step in best[route]:
                        best[route][f"{step[:-2]}_params_per_s"] = params / best[route][step]
            results[qtype] = {"runs": runs, "best": best, "bytes_identical": all(same), "output_bytes": out_bytes,
                              "streamq_over_llamacpp_wall": best["streamq"]["wall_s"] / best["llamacpp"]["wall_s"]}
    record = {
        "git": commit | {"changed_during_run": git_commit()["commit"] != commit["commit"]},
        "machine": machine_facts(),
        "model": {"architecture": "LlamaForCausalLM", **shape, "vocab_size": "small trained BPE (tests/gguf_cases.py)",
                  "params": params, "source_bytes": src_bytes, "dtype": "bfloat16"},
        "threads": {"streamq": f"quantize_rows: os.cpu_count() = {threads}", "llama_quantize": threads},
        "method": (f"each route {args.repeat} times, interleaved, best wall counts (other jobs may share the CPUs); "
                   "source in the page cache; streamq in a fresh interpreter, imports before the clock; llama.cpp's "
                   "steps timed as whole processes (interpreter start included); q8_0: the converter alone"),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'type':<8} {'streamq s':>10} {'M/s':>7} | {'convert s':>10} {'quant s':>8} {'total s':>8} {'M/s':>7} | ratio identical")
    for qtype, r in results.items():
        s, l = r["best"]["streamq"], r["best"]["llamacpp"]
        print(f"{qtype:<8} {s['wall_s']:10.1f} {s['params_per_s'] / 1e6:7.1f} | {l['convert_s']:10.1f} "
              f"{l.get('quantize_s', float('nan')):8.1f} {l['wall_s']:8.1f} {l['params_per_s'] / 1e6:7.1f} | "
              f"{r['streamq_over_llamacpp_wall']:5.2f} {r['bytes_identical']}")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
