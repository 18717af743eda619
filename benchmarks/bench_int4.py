"""Speed of the int4 converter on one weight: round-to-nearest alone (what llm-compressor computes)
against streamq's quantize_weight (RTN plus the grid search), for an ordinary and a QAT weight.
With --baseline REV, also the converter as committed at git revision REV (e.g. main), timed in the
same run on the same weights, and its output checked byte for byte against the working tree's.

    python benchmarks/bench_int4.py [--rows 4096 --cols 4096 --group 32 --repeat 3 --device cpu --out FILE]
    python benchmarks/bench_int4.py --baseline main --group 32 --group 128 --out FILE
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


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


def _converter_at(rev: str, group: int):
    """The Int4Converter of streamq/converters/int4.py at git revision `rev`, imported as a sibling
    module of the package (its relative imports resolve against the working tree's)."""
    source = subprocess.run(["git", "show", f"{rev}:streamq/converters/int4.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "int4_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("streamq.converters._int4_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from streamq.settings import QuantSettings

    return module.Int4Converter(QuantSettings("int4", blocksize=group))


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)) for k in a
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, action="append", help="repeatable; default 32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", metavar="REV", help="also time int4.py as committed at this git revision")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    groups = args.group or [32]

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from int4_cases import on_grid

    from streamq.converters import converter_for
    from streamq.settings import QuantSettings

    generator = torch.Generator().manual_seed(0)
    by_group = {}
    for group in groups:
        converter = converter_for(QuantSettings("int4", blocksize=group))
        baseline = _converter_at(args.baseline, group) if args.baseline else None
        weights = {
            "ordinary": (torch.randn(args.rows, args.cols, generator=generator) * 0.02).to(torch.bfloat16),
            "qat": on_grid(torch.Size([args.rows, args.cols]), group, torch.bfloat16, generator),
        }

        def rtn_only(w: torch.Tensor, group: int = group, converter=converter) -> None:
            groups = w.reshape(w.shape[0], -1, group)
            scale, _ = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), converter.scheme.weights)
            PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, converter.scheme)

        results = {}
        for name, w in weights.items():
            w = w.to(args.device)
            counted: Counter = Counter()
            written = converter.quantize_weight(w, args.device, counted)  # warm up, and count
            rtn = _best(lambda: rtn_only(w), args.repeat, args.device)
            ours = _best(lambda: converter.quantize_weight(w, args.device), args.repeat, args.device)
            params = w.numel()
            row = {
                "rtn_only_s": rtn, "streamq_s": ours, "overhead": ours / rtn,
                "rtn_only_mparams_per_s": params / rtn / 1e6, "streamq_mparams_per_s": params / ours / 1e6,
                "groups": counted["groups"], "groups_exact": counted["groups_exact"],
            }
            if baseline is not None:
                same = _same_bytes(baseline.quantize_weight(w, args.device), written)  # also its warm-up
                before = _best(lambda: baseline.quantize_weight(w, args.device), args.repeat, args.device)
                row.update({
                    "baseline_s": before, "baseline_overhead": before / rtn,
                    "baseline_mparams_per_s": params / before / 1e6, "speedup": before / ours, "same_bytes": same,
                })
            results[name] = row
        by_group[str(group)] = results
    report = {
        "shape": [args.rows, args.cols], "groups": groups, "device": args.device, "repeat": args.repeat,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "baseline": args.baseline, "results": by_group,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
