"""Where llama.cpp's own code comes from: its converter (the `conversion` package and `gguf-py`) and its
libraries (`libggml-base` for the quantizers, `libllama` for llama-quantize's per-tensor type rules).

Both are pinned to one llama.cpp commit, the one the llama-cpp-python 0.3.36 sdist vendors. The libraries
come from that package once installed (`pip install "streamq[gguf]"` builds it). Its wheel does not hold
the converter, which is no installable package of its own (its `llama-cpp-scripts` project pins
transformers 4.57.6), so the converter is read from the same pinned sdist: from `STREAMQ_LLAMA_CPP` (a
llama.cpp tree at that commit), else from a copy cached under `~/.cache/streamq`, which pip fetches once.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from ..errors import StreamqError

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
CONVERTER_PARTS = ("conversion/", "gguf-py/gguf/", "convert_hf_to_gguf.py", "LICENSE")
INSTALL = 'pip install "streamq[gguf]"'
GGML_Q4_0 = 2  # ggml_type values, fixed in the GGUF format
GGML_BF16 = 30


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamq" / f"llama.cpp-{LLAMA_CPP_COMMIT}"


def converter_tree() -> Path:
    """A llama.cpp tree holding `conversion/` and `gguf-py/` at the pinned commit."""
    given = os.environ.get("STREAMQ_LLAMA_CPP")
    if given:
        tree = Path(given).expanduser()
        if not (tree / "conversion" / "base.py").is_file() or not (tree / "gguf-py" / "gguf").is_dir():
            raise StreamqError(f"STREAMQ_LLAMA_CPP={tree} holds no llama.cpp converter (conversion/, gguf-py/); point it at a llama.cpp tree at {LLAMA_CPP_COMMIT}")
        return tree
    tree = cache_root()
    if not (tree / ".complete").is_file():
        _unpack_converter(tree)
    return tree


def _unpack_converter(tree: Path) -> None:
    """Fetch the pinned sdist with pip (from its cache when it built llama-cpp-python) and keep the converter's files."""
    logger.warning("fetching llama.cpp's converter (llama-cpp-python %s sdist, llama.cpp %s) into %s, once", LLAMA_CPP_PYTHON, LLAMA_CPP_COMMIT, tree)
    with tempfile.TemporaryDirectory(prefix="streamq-llama-cpp-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        done = subprocess.run(command, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST
        if done.returncode != 0 or not sdist.is_file():
            raise StreamqError(
                f"cannot fetch llama.cpp's converter (pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed: "
                f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}); set STREAMQ_LLAMA_CPP to a llama.cpp tree at {LLAMA_CPP_COMMIT}"
            )
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise StreamqError(f"{SDIST} has sha256 {digest}, not the pinned {SDIST_SHA256}; not using it")
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_parent(tree)))
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(VENDORED)
                       and m.name[len(VENDORED):].startswith(CONVERTER_PARTS)]
            for member in members:
                member.name = member.name[len(VENDORED):]
            archive.extractall(staging, members=members, filter="data")
        (staging / ".complete").write_text(f"{SDIST} {SDIST_SHA256}\n")
        if tree.exists() and not (tree / ".complete").is_file():
            shutil.rmtree(tree)  # an unpacking that was cut short
        try:
            os.replace(staging, tree)
        except OSError:
            shutil.rmtree(staging)
            if not (tree / ".complete").is_file():  # not another process that finished first
                raise


def _parent(tree: Path) -> Path:
    tree.parent.mkdir(parents=True, exist_ok=True)
    return tree.parent


@cache
def converter() -> tuple[ModuleType, ModuleType]:
    """llama.cpp's `conversion` package and its own `gguf` (PyPI's gguf lags the converter)."""
    tree = converter_tree()
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(tree)):
        raise StreamqError(f"another gguf package ({loaded.__file__}) is already imported; llama.cpp's converter needs its own gguf-py")
    for path in (str(tree / "gguf-py"), str(tree)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        gguf = importlib.import_module("gguf")
        conversion = importlib.import_module("conversion")
    except ImportError as exc:
        raise StreamqError(f"llama.cpp's converter cannot be imported ({exc}); {INSTALL}") from exc
    return conversion, gguf


@cache
def libraries() -> tuple[ctypes.CDLL, ModuleType]:
    """libggml-base (its quantizers) and llama-cpp-python's binding of libllama."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise StreamqError(f"GGUF needs llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp's quantizers); {INSTALL}") from exc
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_PYTHON:
        raise StreamqError(f"GGUF needs llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp {LLAMA_CPP_COMMIT}), found {version}; {INSTALL}")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    return ggml, llama_cpp
