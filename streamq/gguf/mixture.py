"""llama-quantize's choices, from llama.cpp itself: the type of each tensor (its default mixture for a file
type, e.g. Q6_K for some tensors of Q4_K_M, and its fallbacks for rows a type cannot hold) and the order it
writes them in.

`llama_model_quantize` with `dry_run` reads only the input's header. It is given the header of the
converter's intermediate file (bf16, as llama.cpp's quantize README converts) over a sparse file of the
full size, and says per tensor what it would write.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path
from typing import Any

from ..errors import StreamqError
from .header import FilePlan
from .llama_cpp import libraries

_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?")
_LOG_LOCK = threading.Lock()  # llama.cpp's log callback is process-wide


def llama_ftype(llama_cpp: Any, qtype: str) -> int:
    """llama.cpp's file type for one of streamq's GGUF type names (llama.cpp's, lower case)."""
    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"))


def quantized_types(intermediate: FilePlan, ftype: str, work: Path) -> list[tuple[str, str]]:
    """(tensor name, ggml type name) in llama-quantize's output order."""
    _, llama_cpp = libraries()
    sparse = work / "intermediate-header.gguf"
    with open(sparse, "wb") as f:
        f.write(intermediate.header)
        f.truncate(intermediate.size)  # a hole: no disk
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(llama_cpp, ftype)
    params.dry_run = True
    text: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, message: bytes, user_data: ctypes.c_void_p) -> None:
        text.append(message.decode("utf-8", "replace"))

    with _LOG_LOCK:
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            failed = llama_cpp.llama_model_quantize(str(sparse).encode(), str(work / "unused.gguf").encode(), ctypes.byref(params))
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            sparse.unlink(missing_ok=True)
    log = "".join(text)
    if failed:
        raise StreamqError(f"llama.cpp refused to plan {ftype.upper()} for this model: {log.strip().splitlines()[-1] if log.strip() else 'no message'}")
    found = [(m.group(1), m.group(3) or m.group(2)) for m in _LINE.finditer(log)]
    if len(found) != len(intermediate.tensors):
        raise StreamqError(f"llama.cpp's quantize plan lists {len(found)} tensors, the file has {len(intermediate.tensors)}")
    return found
