"""What GGUF Q4_0 does to QAT checkpoints: streamq's Q4_0 (groups on a trained grid keep their scale) beside
llama.cpp's own (convert_hf_to_gguf.py --outtype bf16 + llama-quantize Q4_0, which recomputes d = max / -8).

For tiny synthetic QAT checkpoints of Gemma 4 dense and MoE (tests/gguf_cases.py, qat_group=32: every matrix,
experts and embeddings included, w = bf16(s * q), q in [-8, 7], one bf16 scale per group of 32), it reports per
file: the share of Q4_0 groups and of Q4_0 weights that dequantize back to the source exactly, the largest
weight error, and llama-cpp-python's logits against those of llama.cpp's bf16 file of the same checkpoint
(max difference, top-1 agreement over the positions). Needs the GGUF reference venv (STREAMQ_GGUF_REFERENCE).

    python benchmarks/gguf_qat.py --out benchmarks/results/gguf_qat_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("gemma4", "gemma4_moe")
TOKENS = [1, *range(260, 323)]  # 64 positions


def measure(name: str, path: Path, source: dict, ref: str, reference_logits: np.ndarray) -> dict:
    from gguf_cases import gguf_logits
    from test_gguf import bf16_bits, gguf_tensors

    tensors = gguf_tensors(path)
    groups = exact_groups = weights = exact_weights = 0
    error = 0.0
    for tensor, (kind, values) in tensors.items():
        if kind != "Q4_0":
            continue
        got, want = bf16_bits(values).reshape(-1, 32), bf16_bits(source[tensor][1]).reshape(-1, 32)
        groups += len(got)
        exact_groups += int((got == want).all(axis=1).sum())
        weights += got.size
        exact_weights += int((got == want).sum())
        error = max(error, float(np.abs(values - source[tensor][1]).max()))
    logits = np.array(gguf_logits(ref, path, TOKENS)["logits"])
    return {
        "file": name, "q4_0_groups": groups, "groups_exact": exact_groups / groups, "weights_exact": exact_weights / weights,
        "max_weight_error": error, "max_logits_difference_vs_bf16": float(np.abs(logits - reference_logits).max()),
        "top1_agreement_vs_bf16": float((logits.argmax(axis=1) == reference_logits.argmax(axis=1)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from gguf_cases import gguf_logits, make_checkpoint, reference_python, run_reference
    from test_gguf import gguf_tensors

    from streamq import stream_requantize

    ref = reference_python()
    if ref is None:
        raise SystemExit("set STREAMQ_GGUF_REFERENCE to the GGUF reference venv's python (tests/gguf_reference_setup.sh)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            root = Path(tmp) / family
            src = make_checkpoint(root / f"tiny-{family}-qat", family, qat_group=32)
            result = stream_requantize(src, root / "out", format="gguf", quant_type="q4_0", progress=False)
            [ours] = sorted((root / "out").glob("*.gguf"))
            [naive] = run_reference(ref, src, root / "ref" / "naive.gguf", "q4_0")
            [bf16] = run_reference(ref, src, root / "ref" / "bf16.gguf", "bf16")
            source = gguf_tensors(bf16)
            reference_logits = np.array(gguf_logits(ref, bf16, TOKENS)["logits"])
            rows.append({
                "family": family, "streamq_stats": result.stats,
                "streamq": measure("streamq q4_0", ours, source, ref, reference_logits),
                "llama_cpp": measure("llama.cpp q4_0 (naive)", naive, source, ref, reference_logits),
            })
            print(json.dumps(rows[-1]))
    args.out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "tokens": TOKENS, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
