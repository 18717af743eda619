"""Time bitsandbytes' CPU quantize_4bit against streamq's C kernel on Llama-sized weights.

Both run in the same process on the same tensors, after a warm-up (bitsandbytes' first call, the kernel's check against it).
Runs alternate (one bitsandbytes run, then three kernel runs, --repeat times) and the best time of
each counts, so load from other processes on a shared machine hits both alike. Every result is also
checked for identical bytes.

    python benchmarks/bench_kernel.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch

from streamq.kernels import cpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated, e.g. 4096x4096,4096x11008")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--quant-types", default="nf4,fp4")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dtypes, quant_types = args.dtypes.split(","), args.quant_types.split(",")
    settings = dict(blocksize=args.blocksize, compress_statistics=args.double_quant)

    def bnb(weight: torch.Tensor, quant_type: str):
        return bnbf.quantize_4bit(weight, quant_type=quant_type, quant_storage=torch.uint8, **settings)

    def kernel(weight: torch.Tensor, quant_type: str):
        return cpu.quantize_4bit(weight, quant_type=quant_type, **settings)

    warm = torch.randn(args.blocksize * 300)
    for dtype in dtypes:
        for quant_type in quant_types:
            kernel(warm.to(DTYPES[dtype]), quant_type)
            bnb(warm.to(DTYPES[dtype]), quant_type)

    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in map(parse_shape, args.shapes.split(",")):
        base = torch.randn(shape, generator=gen) * 0.02  # the scale of initialized Llama weights
        for dtype in dtypes:
            weight = base.to(DTYPES[dtype])
            for quant_type in quant_types:
                bnb_s = kernel_s = math.inf
                for _ in range(args.repeat):
                    seconds, theirs = timed(lambda w=weight, q=quant_type: bnb(w, q))
                    bnb_s = min(bnb_s, seconds)
                    for _ in range(3):
                        seconds, ours = timed(lambda w=weight, q=quant_type: kernel(w, q))
                        kernel_s = min(kernel_s, seconds)
                identical = cpu.same_bytes(ours, theirs)
                row = {
                    "shape": list(shape), "dtype": dtype, "quant_type": quant_type, **settings,
                    "bnb_mparams_per_s": round(weight.numel() / bnb_s / 1e6, 1),
                    "kernel_mparams_per_s": round(weight.numel() / kernel_s / 1e6, 1),
                    "speedup": round(bnb_s / kernel_s, 2),
                    "identical": identical,
                }
                results.append(row)
                print(f"{'x'.join(map(str, shape)):>11} {dtype} {quant_type}: bnb {row['bnb_mparams_per_s']:7.1f} M/s  "
                      f"kernel {row['kernel_mparams_per_s']:7.1f} M/s  x{row['speedup']:5.1f}  identical={identical}")

    speedups = [r["speedup"] for r in results]
    summary = {
        "min_speedup": min(speedups),
        "geomean_speedup": round(math.exp(sum(map(math.log, speedups)) / len(speedups)), 2),
        "all_identical": all(r["identical"] for r in results),
    }
    print(f"speed-up: min x{summary['min_speedup']}, geomean x{summary['geomean_speedup']}; "
          f"all identical: {summary['all_identical']}")
    if args.json:
        machine = {
            "cpu_count": os.cpu_count(), "kernel_threads": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
