"""CUDA parity and speed: run on a machine with an NVIDIA GPU.

1. Parity: for tiny models of several families, streamq with device="cuda" against transformers'
   own 4-bit save made on the same GPU (`device_map="cuda"`), byte for byte; and how many bytes
   differ between CPU and CUDA outputs (why streamq records the device in its manifest).
2. Speed: quantize a multi-GB set of Llama-shaped bf16 weights with bitsandbytes' CUDA kernels
   (host->device copy and device->host copy of the results included), with streamq's CPU kernel,
   and with bitsandbytes on CPU (on a slice, extrapolated per parameter), in the same run.

    python benchmarks/gpu_parity_speed.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parity() -> list[dict]:
    from streamq import stream_requantize
    from streamq.quantize import quantize_weight
    from tiny_models import bnb_config, byte_mismatches, load_tensors, make_model
    from transformers import AutoModelForCausalLM

    rows = []
    for family in ("llama", "gemma", "qwen"):
        for quant_type, dq in (("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                src = make_model(tmp / "src", family, torch.bfloat16)
                ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(quant_type, dq), device_map="cuda")
                ref.save_pretrained(tmp / "ref")
                stream_requantize(src, tmp / "cuda", quant_type=quant_type, double_quant=dq, device="cuda", progress=False)
                stream_requantize(src, tmp / "cpu", quant_type=quant_type, double_quant=dq, device="cpu", progress=False)
                cuda, cpu, reft = load_tensors(tmp / "cuda"), load_tensors(tmp / "cpu"), load_tensors(tmp / "ref")
                differing = sum(int((cuda[k].reshape(-1).view(torch.uint8) != cpu[k].reshape(-1).view(torch.uint8)).sum()) for k in cuda if cuda[k].shape == cpu[k].shape)
                total = sum(t.numel() * t.element_size() for t in cuda.values())
                rows.append({
                    "family": family, "quant_type": quant_type, "double_quant": dq,
                    "cuda_vs_transformers_cuda_mismatched_tensors": len(byte_mismatches(cuda, reft)),
                    "tensors": len(cuda),
                    "cpu_vs_cuda_differing_bytes_pct": 100.0 * differing / total,
                })
                print(rows[-1], flush=True)
    # Larger weights, where CPU/CUDA differences show up per quantity.
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(4096, 4096, generator=gen) * 0.02).to(torch.bfloat16)
    from streamq.settings import QuantSettings

    for quant_type in ("nf4", "fp4"):
        s = QuantSettings(quant_type=quant_type)
        a, b = quantize_weight(w, s, "cpu"), quantize_weight(w, s, "cuda")
        rows.append({
            "tensor": "4096x4096 bf16", "quant_type": quant_type,
            **{f"cpu_vs_cuda_diff_pct{k or '[packed]'}": 100.0 * float((a[k].reshape(-1).view(torch.uint8) != b[k].reshape(-1).view(torch.uint8)).float().mean()) for k in a},
        })
        print(rows[-1], flush=True)
    return rows


def speed(total_gb: float) -> dict:
    import bitsandbytes.functional as F

    from streamq.kernels import cpu as kernel

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 3  # one Llama-7B layer
    layer_params = sum(a * b for a, b in shapes)
    layers = max(1, int(total_gb * 1e9 / 2 / layer_params))
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for s in shapes]
    params = layer_params * layers

    def gpu_pass() -> None:
        for _ in range(layers):
            for w in weights:
                packed, state = F.quantize_4bit(w.to("cuda", non_blocking=False), blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
                packed.cpu()
                state.as_dict(packed=True)
        torch.cuda.synchronize()

    F.quantize_4bit(weights[0].to("cuda"), blocksize=64, compress_statistics=True, quant_type="nf4")  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu_pass()
    gpu_s = time.perf_counter() - t

    kernel.quantize_4bit(weights[0], quant_type="nf4")  # warm-up: the kernel checks itself against bitsandbytes once
    t = time.perf_counter()
    for w in weights:
        kernel.quantize_4bit(w, quant_type="nf4")
    kernel_rate = layer_params / (time.perf_counter() - t)

    t = time.perf_counter()
    F.quantize_4bit(weights[0], blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    bnb_cpu_rate = weights[0].numel() / (time.perf_counter() - t)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
        "params": params,
        "input_gb_bf16": params * 2 / 1e9,
        "cuda_bnb_mparams_s": params / gpu_s / 1e6,
        "cuda_bnb_input_gb_s": params * 2 / gpu_s / 1e9,
        "cpu_streamq_kernel_mparams_s": kernel_rate / 1e6,
        "cpu_bnb_mparams_s": bnb_cpu_rate / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the bf16 weight set for the speed test")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    result = {"parity": parity(), "speed": speed(args.gb)}
    print(json.dumps(result["speed"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
