"""Re-quantize a real Hub model into your own 4-bit repo (needs network and a write token; not run in CI).

    export HF_TOKEN=hf_...            # a token with write access to your namespace
    export HF_XET_HIGH_PERFORMANCE=1  # optional: let hf_xet use more CPU and bandwidth
    python examples/real_hub.py Qwen/Qwen2.5-7B-Instruct your-name/Qwen2.5-7B-Instruct-nf4

On a spot VM or a notebook that may vanish, run it again with the same arguments: finished shards are
skipped and the run goes on where it stopped. `streamq plan` first tells you how much disk it needs.
"""

from __future__ import annotations

import sys

from streamq import plan_requantize, stream_requantize, verify_output
from streamq.report import format_plan, plan_summary


def main(src: str, dst: str) -> None:
    plan = plan_requantize(src)  # headers only: no weights are downloaded yet
    print(format_plan(plan_summary(plan, downloads=True)))
    result = stream_requantize(src, dst, private=True)
    print(f"{result.output}: {result.bytes_in / 1e9:.1f} GB -> {result.bytes_out / 1e9:.1f} GB in {result.elapsed / 60:.1f} min")
    report = verify_output(dst)
    print("verified" if report.ok else f"problems: {report.problems}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
