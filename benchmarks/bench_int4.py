"""Speed of the int4 converter on one weight: round-to-nearest alone (what llm-compressor computes)
against streamq's quantize_weight (RTN plus the grid search), for an ordinary and a QAT weight.

    python benchmarks/bench_int4.py [--rows 4096 --cols 4096 --group 32 --repeat 3 --device cpu --out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _best(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from int4_cases import on_grid

    from streamq.converters import converter_for
    from streamq.settings import QuantSettings

    converter = converter_for(QuantSettings("int4", blocksize=args.group))
    generator = torch.Generator().manual_seed(0)
    weights = {
        "ordinary": (torch.randn(args.rows, args.cols, generator=generator) * 0.02).to(torch.bfloat16),
        "qat": on_grid(torch.Size([args.rows, args.cols]), args.group, torch.bfloat16, generator),
    }

    def rtn_only(w: torch.Tensor) -> None:
        groups = w.reshape(w.shape[0], -1, args.group)
        scale, _ = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), converter.scheme.weights)
        PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, converter.scheme)

    results = {}
    for name, w in weights.items():
        w = w.to(args.device)
        counted: Counter = Counter()
        converter.quantize_weight(w, args.device, counted)  # warm up, and count
        rtn = _best(lambda: rtn_only(w), args.repeat, args.device)
        ours = _best(lambda: converter.quantize_weight(w, args.device), args.repeat, args.device)
        params = w.numel()
        results[name] = {
            "rtn_only_s": rtn, "streamq_s": ours, "overhead": ours / rtn,
            "rtn_only_mparams_per_s": params / rtn / 1e6, "streamq_mparams_per_s": params / ours / 1e6,
            "groups": counted["groups"], "groups_exact": counted["groups_exact"],
        }
    report = {
        "shape": [args.rows, args.cols], "group": args.group, "device": args.device, "repeat": args.repeat,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
