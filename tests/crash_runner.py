"""Run the streamq CLI and kill -9 this very process at a named point of the pipeline.

    python tests/crash_runner.py POINT N -- requantize SRC DST [options]

The N-th time the pipeline reaches POINT, the process sends itself SIGKILL: no exception handler,
no `finally`, no flush runs, exactly like a VM that vanishes.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

# point -> (module, attribute path, "before" or "after" the call)
POINTS = {
    "before-download": ("streamq.fetch", "HubSource.stream", "before"),
    "after-download": ("streamq.fetch", "HubSource.stream", "after"),
    "before-local-read": ("streamq.window", "InPlace.mapped", "before"),
    "during-quantize": ("streamq.convert", "quantize_weight", "before"),
    "after-write": ("streamq.write", "SafetensorsWriter.finalize", "after"),
    "during-upload": ("huggingface_hub.lfs", "_upload_single_part", "after"),  # bytes sent, not verified
    "between-upload-and-commit": ("streamq.publish", "HubSink._commit", "before"),
    "after-commit": ("streamq.publish", "HubSink._commit", "after"),
    "before-local-publish": ("streamq.publish", "LocalSink.add_shard", "before"),
    "after-local-publish": ("streamq.publish", "LocalSink.add_shard", "after"),
    "during-final-commit": ("streamq.publish", "HubSink.finalize", "before"),
    "during-local-finalize": ("streamq.publish", "LocalSink._write", "before"),
}


def install(point: str, n: int) -> None:
    import importlib

    module_name, path, when = POINTS[point]
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if when == "after" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    point, n, sep, *cli_args = sys.argv[1:]
    assert sep == "--", __doc__
    install(point, int(n))
    from streamq.cli import main

    sys.exit(main(cli_args))
