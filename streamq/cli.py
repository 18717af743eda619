"""`streamq` command line: the library's functions as subcommands, one flag per option, one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from . import __version__
from .commits import DEFAULT_COMMITS_PER_HOUR
from .errors import StreamqError
from .settings import DEFAULT_MAX_SHARD_SIZE, FORMATS, GGUF_TYPES
from .surface import using

EXAMPLES = """examples:
  streamq requantize meta-llama/Llama-3.1-8B-Instruct me/Llama-3.1-8B-Instruct-nf4
  streamq requantize org/model@v1.0 ./model-nf4 --work-dir /mnt/scratch
  streamq requantize ./my-model me/my-model-fp4 --quant-type fp4 --no-double-quant --private
  streamq requantize google/gemma-4-31B-it-qat-q4_0-unquantized me/gemma-4-31B-qat-int4 --quant-type int4 --blocksize 32
  streamq requantize deepseek-ai/DeepSeek-V3 me/DeepSeek-V3-bf16 --quant-type bf16   # dequantize an FP8 model
  streamq plan mistralai/Mistral-7B-v0.3            # what would happen, without downloading weights
  streamq verify me/Llama-3.1-8B-Instruct-nf4 --load
  streamq status me/Llama-3.1-8B-Instruct-nf4
  streamq app --port 7860                           # the web page (pip install "streamq[app]")

Run the same requantize command again to resume an interrupted run.
Environment: HF_TOKEN, HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_PROGRESS_BARS, HF_HUB_OFFLINE as in huggingface_hub.
Exit codes: 0 done, 1 error (one line on stderr), 2 bad arguments, 3 verify found problems, 130 interrupted.
"""


def _hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login); never printed")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")


def _plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="IN", help="Hub repo id (org/name[@revision]) or local directory (./dir, /dir, ~/dir)")
    parser.add_argument("--revision", help="source branch, tag or commit (same as IN@revision)")
    parser.add_argument("--format", choices=list(FORMATS), default="safetensors",
                        help="safetensors (transformers, vLLM) or gguf (llama.cpp, Ollama, LM Studio)")
    parser.add_argument("--quant-type", type=str.lower, metavar="TYPE",
                        help="safetensors: nf4 (default)/fp4: bitsandbytes; int4: compressed-tensors pack-quantized W4A16 (transformers, vLLM); "
                             f"bf16: an FP8/MXFP4 source written dequantized. gguf: llama.cpp's {', '.join(GGUF_TYPES)} (default q4_k_m)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="do not quantize the absmax statistics")
    parser.add_argument("--blocksize", type=int, help="bitsandbytes block size (default 64), or the int4 group size: 32, 64 or 128 (default 128; 32 for Q4_0-style QAT checkpoints)")
    parser.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--skip-modules", nargs="+", metavar="NAME", help="modules kept in full precision (replaces transformers' defaults, like llm_int8_skip_modules)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help=f"cut the output into shards of at most SIZE, as transformers' save_pretrained does (default {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow building models that ship custom code (read it first)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _hub_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamq",
        description="Re-quantize a Hugging Face model tensor by tensor, on a small disk: bitsandbytes NF4/FP4, compressed-tensors int4, or bf16 from an FP8/MXFP4 source.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"streamq {__version__}")
    # The global options are accepted after the subcommand too (`streamq requantize a b -v`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log detail (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common], **kwargs)

    run = command("requantize", "convert IN into a 4-bit repo or directory OUT", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _plan_options(run)
    run.add_argument("dst", metavar="OUT", help="Hub repo id or local directory for the 4-bit model")
    run.add_argument("--dry-run", action="store_true", help="print the plan (same as `streamq plan`) and stop")
    run.add_argument("--work-dir", help="where a folder for this output holds the read-ahead window and the output shards in flight, found again by a rerun (default: STREAMQ_WORK_DIR or the temp dir)")
    run.add_argument("--private", action="store_true", help="create the output repo private")
    run.add_argument("--branch", help="publish to this branch of OUT instead of main")
    run.add_argument("--create-pr", action="store_true", help="stage on a branch (--branch, default streamq-4bit), then open a pull request")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--overwrite", action="store_true", help="discard an existing output made from another revision or with other settings")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to quantize (recorded in the manifest)")
    run.add_argument("--disk-budget", type=float, metavar="GB", help="the most work_dir may hold (default: two output shards, the largest tensor and 1 GB of read-ahead)")
    run.add_argument("--cluster", metavar="ADDRESS", help='run on a Ray cluster: "auto" (this machine is in it), ray://host:10001, or host:port; needs pip install "streamq[ray]"')
    run.add_argument(
        "--commits-per-hour", type=int, default=DEFAULT_COMMITS_PER_HOUR, metavar="N",
        help=f"most Hub commits in any hour, counting the output's recent ones (default {DEFAULT_COMMITS_PER_HOUR}); more shards are committed in batches",
    )

    plan = command("plan", "show what requantize would do, reading only headers")
    _plan_options(plan)

    verify = command("verify", "check a finished output against its manifest")
    verify.add_argument("dst", metavar="OUT")
    verify.add_argument("--branch")
    verify.add_argument("--load", action="store_true", help="also load it with transformers on CPU and run one forward pass")
    verify.add_argument("--json", action="store_true")
    _hub_options(verify)

    status = command("status", "what the manifest of OUT says: done, pending, settings")
    status.add_argument("dst", metavar="OUT")
    status.add_argument("--branch")
    status.add_argument("--json", action="store_true")
    _hub_options(status)

    app = command("app", 'serve the web page (needs pip install "streamq[app]")')
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    app.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    app.add_argument("--work-dir", help="where conversions keep partial downloads (default: STREAMQ_WORK_DIR, /data/streamq, or the temp dir)")
    app.add_argument("--cluster", metavar="ADDRESS", help="run the page's conversions (but GGUF) on this Ray cluster, as requantize --cluster")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)], format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:  # every HTTP request is logged at INFO by the HTTP client: only -vv shows them
        for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with using("cli"):
            return COMMANDS[args.command](args)
    except (StreamqError, ValueError) as exc:
        print(f"streamq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamq: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


PLAN_OPTIONS = ("revision", "format", "quant_type", "double_quant", "blocksize", "compute_dtype", "skip_modules", "max_shard_size", "token", "endpoint", "trust_remote_code")


def _plan(args: argparse.Namespace) -> int:
    from .fetch import HubSource  # noqa: F401  (keeps import errors inside the error handler)
    from .location import HubRepo, parse_location
    from .pipeline import plan_requantize
    from .report import format_gguf_plan, format_plan, gguf_plan_summary, plan_summary

    plan = plan_requantize(args.src, **_options(args, *PLAN_OPTIONS))
    downloads = isinstance(parse_location(args.src), HubRepo)
    if args.format == "gguf":
        summary = gguf_plan_summary(plan, downloads=downloads)
        print(json.dumps(summary, indent=2) if args.json else format_gguf_plan(summary))
        return 0
    summary = plan_summary(plan, downloads=downloads)
    print(json.dumps(summary, indent=2) if args.json else format_plan(summary, verbose=args.verbose > 0, rules=plan.rules))
    return 0


def _requantize(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _plan(args)
    from .pipeline import stream_requantize
    from .report import human_size

    options = _options(args, *PLAN_OPTIONS, "work_dir", "private", "branch", "create_pr", "progress", "overwrite", "device", "commits_per_hour", "cluster")
    if args.disk_budget is not None:
        options["disk_budget"] = int(args.disk_budget * 1e9)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1" or not sys.stderr.isatty():
        options["progress"] = False
    result = stream_requantize(args.src, args.dst, **options)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio}, indent=2))
        return 0
    rate = result.bytes_converted / result.elapsed / 1e6 if result.elapsed else 0.0
    rows = [
        ("output", result.output),
        ("shards", f"{result.shards} ({result.shards_skipped} already done)"),
        ("tensors", f"{result.tensors_quantized} quantized, {result.tensors_kept} kept"),
        ("size", f"{human_size(result.bytes_in)} -> {human_size(result.bytes_out)} ({result.ratio:.2f}x smaller)"),
        ("time", f"{result.elapsed:.1f} s ({rate:.1f} MB/s of input converted by this run)"),
    ]
    if args.format == "gguf":
        from .gguf.qat import grid_line

        line = grid_line(result.stats)
        rows += [("QAT", line)] if line else []
    print("\n".join(f"{k:<8} {v}" for k, v in rows))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_output

    report = verify_output(args.dst, **_options(args, "load", "branch", "token", "endpoint"))
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "checked_files": report.checked_files, "loaded": report.loaded}, indent=2))
    else:
        loaded = "" if report.loaded is None else (", loaded and ran one forward pass" if report.loaded else "")
        print(f"{report.location}: {'OK' if report.ok else 'PROBLEMS'} ({report.checked_files} shards checked{loaded})")
        for problem in report.problems:
            print(f"  - {problem}")
    return 0 if report.ok else 3


def _status(args: argparse.Namespace) -> int:
    from .report import format_status
    from .verify import read_status

    manifest = read_status(args.dst, **_options(args, "branch", "token", "endpoint"))
    print(json.dumps(asdict(manifest), indent=2) if args.json else format_status(manifest))
    return 0


def _app(args: argparse.Namespace) -> int:
    try:
        from .app import build_app, launch
    except ImportError as exc:
        raise StreamqError(f'the app needs its extra packages ({exc.name} is missing): pip install "streamq[app]"') from exc
    launch(build_app(endpoint=args.endpoint, work_dir=args.work_dir, cluster=args.cluster), host=args.host, port=args.port)
    return 0


COMMANDS = {"requantize": _requantize, "plan": _plan, "verify": _verify, "status": _status, "app": _app}


if __name__ == "__main__":
    sys.exit(main())
