"""`streamq` command line: the library's options, one flag each, with one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from .errors import StreamqError

EXAMPLES = """examples:
  streamq requantize meta-llama/Llama-3.1-8B-Instruct me/Llama-3.1-8B-Instruct-nf4
  streamq requantize org/model@v1.0 ./model-nf4 --work-dir /mnt/scratch
  streamq requantize ./my-model me/my-model-fp4 --quant-type fp4 --no-double-quant --private

Run the same command again to resume an interrupted run. HF_TOKEN and HF_ENDPOINT are honoured.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamq", description="Re-quantize a Hugging Face model to 4-bit bitsandbytes, shard by shard.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("requantize", help="convert IN to a 4-bit repo or directory OUT", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("src", metavar="IN", help="Hub repo id (org/name[@revision]) or local directory (./dir, /dir, ~/dir)")
    run.add_argument("dst", metavar="OUT", help="Hub repo id or local directory for the 4-bit model")
    run.add_argument("--revision", help="source branch, tag or commit (same as IN@revision)")
    run.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    run.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="do not quantize the absmax statistics")
    run.add_argument("--blocksize", type=int, default=64)
    run.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    run.add_argument("--skip-modules", nargs="+", metavar="NAME", help="modules kept in full precision (replaces transformers' defaults, like llm_int8_skip_modules)")
    run.add_argument("--work-dir", help="where the one input and one output shard live (default: a temporary directory)")
    run.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    run.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    run.add_argument("--private", action="store_true", help="create the output repo private")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--overwrite", action="store_true", help="discard an existing output made from another revision or with other settings")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to quantize (recorded in the manifest)")
    run.add_argument("--trust-remote-code", action="store_true", help="allow building models that ship custom code (read it first)")
    run.add_argument("--min-commit-interval", type=float, default=36.0, help="seconds between Hub commits; shards in between are committed together")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)], format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import stream_requantize

    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "src", "dst", "json")}
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" or not sys.stderr.isatty():
        options["progress"] = False
    try:
        result = stream_requantize(args.src, args.dst, **options)
    except (StreamqError, ValueError) as exc:
        print(f"streamq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamq: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio}, indent=2))
    else:
        print(
            f"{result.output}: {result.shards} shards ({result.shards_skipped} already done), "
            f"{result.tensors_quantized} tensors quantized, {result.tensors_kept} kept, "
            f"{result.bytes_in / 1e9:.2f} GB -> {result.bytes_out / 1e9:.2f} GB ({result.ratio:.2f}x) in {result.elapsed:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
