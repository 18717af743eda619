"""What int4 does to QAT checkpoints: streamq's grid-exact scales against naive scales recomputed per
group (max/7.5, what a min-max observer and llm-compressor's RTN compute, and max/8).

For tiny synthetic QAT checkpoints (weights put on a Q4_0-style grid: groups of 32, q in [-8, 7], one
bf16 scale per group) of a Llama-like model, a Gemma 4 dense model (k=v global attention), a Gemma 4
MoE model and Mixtral, it reports the largest weight error and the logits difference of:
  - streamq's int4 output, loaded back by transformers (compressed-tensors, dequantized);
  - the same weights quantized with a scale of max|w|/7.5 or max|w|/8 per group of 32.

    python benchmarks/int4_qat.py --out benchmarks/results/int4_qat_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GROUP = 32
FAMILIES = ("llama", "gemma4", "gemma4_moe", "mixtral")


def naive(w: torch.Tensor, divisor: float) -> torch.Tensor:
    """Round to nearest with scale = dtype(max|w| / divisor) per group of GROUP inputs."""
    groups = w.reshape(*w.shape[:-1], -1, GROUP)
    scale = (groups.abs().amax(dim=-1, keepdim=True).float() / divisor).to(w.dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(torch.clamp(groups / scale, -8, 7))
    return (q * scale).reshape(w.shape)


def compare(reference: dict[str, torch.Tensor], model, ids: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    got = model.state_dict()
    err = max((got[k].float() - v.float()).abs().max().item() for k, v in reference.items())
    with torch.no_grad():
        logits = model(ids).logits
    return {
        "max_abs_weight_error": err,
        "max_abs_logits_diff": (logits.float() - ref_logits.float()).abs().max().item(),
        "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "logits_identical": bool(torch.equal(logits, ref_logits)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from int4_cases import load_dequantized, make_model
    from transformers import AutoModelForCausalLM

    from streamq import stream_requantize

    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(7))
    results = {}
    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            src = make_model(Path(tmp) / "src", family, qat_group=GROUP)
            result = stream_requantize(src, Path(tmp) / "out", quant_type="int4", blocksize=GROUP, progress=False)
            source = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
            with torch.no_grad():
                ref_logits = source(ids).logits
            reference = {k: v.clone() for k, v in source.state_dict().items()}
            row = {"groups": result.stats["groups"], "groups_exact": result.stats["groups_exact"],
                   "streamq_int4": compare(reference, load_dequantized(Path(tmp) / "out"), ids, ref_logits)}
            # The naive converters quantize the same tensors streamq does: the loaded int4 model tells which.
            quantized = [k for k in reference if k.endswith("weight") or ".experts." in k]
            quantized = [k for k in quantized if _quantized(source, k, family)]
            for divisor in (7.5, 8.0):
                model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if name in quantized:
                            param.copy_(naive(param, divisor))
                row[f"naive_max_over_{divisor:g}"] = compare(reference, model, ids, ref_logits)
            results[family] = row
            print(family, json.dumps(row))
    report = {"group": GROUP, "input_tokens": ids.shape[1], "torch": torch.__version__, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _quantized(model, name: str, family: str) -> bool:
    """The parameters streamq's int4 quantizes: Linear weights but lm_head, and (Mixtral) the experts
    transformers fuses from per-expert checkpoint weights; Gemma 4's stored-fused experts stay bf16."""
    module_name = name.rsplit(".", 1)[0]
    module = model.get_submodule(module_name)
    if isinstance(module, torch.nn.Linear):
        return name.endswith(".weight") and module_name != "lm_head"
    return ".experts." in f"{name}." and family == "mixtral"


if __name__ == "__main__":
    main()
