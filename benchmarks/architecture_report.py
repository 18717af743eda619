"""Print a Markdown table: streamq vs transformers' own 4-bit save, for every case of tests/test_architectures.py.

Usage: python benchmarks/architecture_report.py [name-substring ...]

It runs the very cases the tests assert (tests/arch_cases.py): tiny random checkpoints, converted by
transformers (`from_pretrained(load_in_4bit)` + `save_pretrained`) and by streamq, then compared.
"parity bytes" means every tensor and config.json are identical; "parity logits" means the outputs
of streamq's checkpoint, loaded back, equal those of transformers' in-memory 4-bit model.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from arch_cases import CASES, ArchCase, convert  # noqa: E402


def _row(case: ArchCase, work: Path, notes: list[str]) -> str:
    conversion = convert(case, work)
    differences = conversion.checkpoint_differences()
    ours_cfg, ref_cfg = conversion.configs()
    same_bytes = not any(differences.values()) and ours_cfg == ref_cfg
    try:
        ours, ref = conversion.outputs()
        same_outputs = "yes" if torch.equal(ours, ref) else "no"
    except Exception as exc:  # transformers itself cannot run or reload this model in 4 bit
        if case.outputs_xfail is None:
            raise
        notes.append(f"{case.name}: {case.outputs_xfail} ({type(exc).__name__})")
        same_outputs = f"n/a [{len(notes)}]"
    result = conversion.result
    return (
        f"| {case.name} | {result.tensors_quantized} | {result.tensors_kept} | {'yes' if same_bytes else 'no'} "
        f"| {same_outputs} | {result.bytes_out / result.bytes_in:.2f} |"
    )


def main(selected: list[str]) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    cases = [c for c in CASES if not selected or any(s in c.name for s in selected)]
    notes: list[str] = []
    print("| architecture | tensors quantized | tensors kept | parity bytes | parity logits | output size ratio (out/in) |")
    print("| --- | ---: | ---: | :---: | :---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="streamq-arch-") as tmp:
        for number, case in enumerate(cases):
            print(_row(case, Path(tmp) / str(number), notes), flush=True)
    for number, note in enumerate(notes, 1):
        print(f"\n[{number}] {note}")


if __name__ == "__main__":
    main(sys.argv[1:])
