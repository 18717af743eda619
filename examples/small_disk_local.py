"""Convert a model directory on a disk too small for a second full-precision copy: local -> local.

    python examples/small_disk_local.py ./big-model ./big-model-nf4 --work-dir /mnt/scratch

Source shards are read in place (memory-mapped, one tensor at a time) and each output shard is written
to `--work-dir` then moved into the output directory, so the disk needs the source, the ~3.5x smaller
output, and one output shard of headroom; `streamq plan ./big-model` prints the figures first.
Stop it at any time and run it again: published shards are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamq import iter_requantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args()

    for record in iter_requantize(args.src, args.dst, work_dir=args.work_dir):
        state = "already done" if record.skipped else f"{record.input_bytes / 1e9:.2f} GB -> {record.output_bytes / 1e9:.2f} GB"
        print(f"[{record.index}/{record.total}] {record.name}: {state}")


if __name__ == "__main__":
    main()
