"""What llama.cpp writes for a checkpoint: the GGUF reference (issue 27).

Runs in the GGUF reference virtualenv (tests/gguf_reference_setup.sh), called by subprocess like
tests/int4_reference.py:

    python gguf_reference.py SRC OUT TYPE [--intermediate bf16|f16|auto] [--binding]
                             [--split-max-tensors N | --split-max-size S] [--split-by gguf-split|convert]
                             [--mmproj MMPROJ [--mmproj-outtype f16|bf16|q8_0|f32]]

SRC: a Hugging Face checkpoint directory. OUT: the .gguf file to write; with a split option the files are
`<OUT without .gguf>-0000k-of-0000N.gguf` (and OUT itself is not left behind). TYPE, as llama.cpp names it:
  - bf16, f16, q8_0: `convert_hf_to_gguf.py SRC --outtype TYPE --outfile OUT`;
  - q4_0, q4_k_m, q5_k_m, q6_k (any llama-quantize type): convert with `--outtype INTERMEDIATE` (default bf16,
    as llama.cpp's tools/quantize/README.md does; the gguf-my-repo Space uses f16), then `llama-quantize
    INTERMEDIATE.gguf OUT TYPE` with no other option: llama.cpp's default per-tensor mixture for that type.
    --binding quantizes through llama-cpp-python's `llama_model_quantize` with
    `llama_model_quantize_default_params()` instead of the CLI (the two should write the same bytes).
Splitting: by default as `llama-gguf-split --split [--split-max-tensors N | --split-max-size S] OUT PREFIX`
does on the single file; --split-by convert passes the split option to the converter instead (bf16/f16/q8_0
only: llama-quantize writes a single file unless its input is split and --keep-split is given).
--mmproj MMPROJ also writes the multimodal projector, `convert_hf_to_gguf.py SRC --mmproj --outtype T --outfile
MMPROJ` (T: --mmproj-outtype, default TYPE for the converter's own types, else f16), listed last.

Prints one JSON line: the files written, in order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"
LLAMA_CPP = Path(sys.prefix) / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
BIN = Path(sys.prefix) / "llama.cpp-build" / "bin"
CONVERTER_TYPES = {"bf16", "f16", "q8_0", "f32"}


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def convert(src: Path, out: Path, outtype: str, split: list[str], mmproj: bool = False) -> None:
    run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(src), "--outtype", outtype, "--outfile", str(out), *split,
         *(["--mmproj"] if mmproj else [])])


def quantize(inp: Path, out: Path, qtype: str, binding: bool) -> None:
    if not binding:
        run([str(BIN / "llama-quantize"), str(inp), str(out), qtype.upper()])
        return
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    if llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {inp} -> {qtype}")


def split_files(prefix: Path) -> list[Path]:
    files = sorted(prefix.parent.glob(f"{prefix.name}-*-of-*.gguf"))
    if not files:
        raise SystemExit(f"no split files {prefix}-*-of-*.gguf")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("type")
    ap.add_argument("--intermediate", default="bf16", choices=["bf16", "f16", "auto"])
    ap.add_argument("--binding", action="store_true")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--split-max-tensors", type=int)
    group.add_argument("--split-max-size")
    ap.add_argument("--split-by", default="gguf-split", choices=["gguf-split", "convert"])
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--mmproj-outtype", choices=sorted(CONVERTER_TYPES))
    args = ap.parse_args()
    files = text_files(args)
    if args.mmproj is not None:
        mmproj = args.mmproj.resolve()
        mmproj.parent.mkdir(parents=True, exist_ok=True)
        outtype = args.mmproj_outtype or (args.type.lower() if args.type.lower() in CONVERTER_TYPES else "f16")
        convert(args.src, mmproj, outtype, [], mmproj=True)
        files.append(str(mmproj))
    print(json.dumps(files))


def text_files(args: argparse.Namespace) -> list[str]:
    qtype = args.type.lower()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    split = (["--split-max-tensors", str(args.split_max_tensors)] if args.split_max_tensors
             else ["--split-max-size", args.split_max_size] if args.split_max_size else [])
    prefix = out.with_suffix("")
    if split and args.split_by == "convert":
        if qtype not in CONVERTER_TYPES:
            raise SystemExit("--split-by convert: only for the converter's own types (bf16, f16, q8_0)")
        convert(args.src, out, qtype, split)  # the converter names the splits after --outfile without .gguf
        return [str(p) for p in split_files(prefix)]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-ref-") as tmp:
        single = out if not split else Path(tmp) / "single.gguf"
        if qtype in CONVERTER_TYPES:
            convert(args.src, single, qtype, [])
        else:
            intermediate = Path(tmp) / f"intermediate-{args.intermediate}.gguf"
            convert(args.src, intermediate, args.intermediate, [])
            quantize(intermediate, single, qtype, args.binding)
        if not split:
            return [str(out)]
        run([str(BIN / "llama-gguf-split"), "--split", *split, str(single), str(prefix)])
    return [str(p) for p in split_files(prefix)]


if __name__ == "__main__":
    main()
