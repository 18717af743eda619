"""bitsandbytes, imported once without its inference-only noise."""

from __future__ import annotations

import functools
import logging
from types import ModuleType


@functools.cache  # the quantizer asks for it once per weight
def bitsandbytes_functional() -> ModuleType:
    """`bitsandbytes.functional`. The first import happens here, where bitsandbytes would log, on CPUs
    with AVX512-BF16, that its optional CPU inference kernel (package `kernels`) is missing: streamq runs
    no inference (a process that only loads the output with transformers still gets the message)."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional
    finally:
        noisy.setLevel(level)
    return bitsandbytes.functional
