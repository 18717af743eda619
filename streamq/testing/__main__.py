"""`python -m streamq.testing --root DIR [--port N] [--host H]`: serve a Hub emulator until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from .server import LocalHub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m streamq.testing", description="Serve a Hugging Face Hub emulator until Ctrl-C."
    )
    parser.add_argument("--root", required=True, help="directory holding the repos (kept across restarts)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    with LocalHub(args.root, host=args.host, port=args.port) as hub:
        print(f"Hub emulator serving {args.root} at {hub.endpoint}", flush=True)
        print(f"use it with: HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
