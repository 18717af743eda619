#!/usr/bin/env bash
# The GGUF reference virtualenv (issue 27): llama.cpp's own converter and quantizer, pinned, for the GGUF
# parity tests. Usage: bash tests/gguf_reference_setup.sh DEST   (then STREAMQ_GGUF_REFERENCE=DEST/bin/python)
#
# What DEST holds afterwards:
#   DEST/src/llama_cpp_python-0.3.36/           the llama-cpp-python sdist, unpacked; it vendors llama.cpp
#                                               at 0c1e57098 (vendor/llama.cpp: convert_hf_to_gguf.py,
#                                               conversion/, gguf-py/)
#   DEST/llama.cpp-build/bin/                   libllama.so + libggml*.so, llama-quantize, llama-gguf-split,
#                                               built from those vendored sources (CPU only)
#   DEST/lib/python3*/site-packages/            llama_cpp (the sdist's Python package, its lib/ holding the
#                                               libraries above), gguf (the vendored gguf-py), torch, transformers
#
# One cmake build of the vendored tree serves both the Python binding and the two tools: the sdist's own
# pip build compiles llama.cpp as a subproject, where LLAMA_BUILD_TOOLS defaults to OFF (no llama-gguf-split,
# no llama-quantize), and it also compiles llama-common and mtmd, which the binding does not need. So the
# sdist is installed with -DLLAMA_BUILD=OFF (Python only) and the libraries built here are copied into its
# llama_cpp/lib, where its loader looks. Timings on 2 cores: tests/GGUF_REFERENCE.md. Run again, it returns
# at once while DEST holds a finished build of this same recipe.
#
# Environment: GGUF_REF_JOBS (parallel compile jobs, default nproc); GGUF_REF_SDIST (a local copy of
# llama_cpp_python-0.3.36.tar.gz, else it is downloaded from PyPI).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DEST" >&2; exit 2; }
DEST=$(realpath -m "$1")
JOBS=${GGUF_REF_JOBS:-$(nproc)}
VERSION=0.3.36
SDIST=llama_cpp_python-$VERSION.tar.gz
stamp() { echo "[gguf-ref $(date -u +%H:%M:%S) +$((SECONDS))s] $*"; }

# A venv this recipe finished before is reused as is (CI can cache DEST): the stamp is the recipe's sha256.
RECIPE=$(sha256sum "$0" | cut -d' ' -f1)
if [ -x "$DEST/bin/python" ] && [ "$(cat "$DEST/.gguf-reference-ready" 2>/dev/null)" = "$RECIPE" ]; then
    stamp "$DEST is up to date"; exit 0
fi
rm -f "$DEST/.gguf-reference-ready"
stamp "venv at $DEST"
python3 -m venv "$DEST"
PY="$DEST/bin/python"
"$PY" -m pip install -q --upgrade pip
mkdir -p "$DEST/src"
if [ -n "${GGUF_REF_SDIST:-}" ]; then
    cp "$GGUF_REF_SDIST" "$DEST/src/$SDIST"
elif [ ! -f "$DEST/src/$SDIST" ]; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DEST/src"
fi
rm -rf "$DEST/src/llama_cpp_python-$VERSION"
tar xzf "$DEST/src/$SDIST" -C "$DEST/src"
SRC="$DEST/src/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
stamp "sdist unpacked"

# Python side, pinned. transformers: the converter's requirements file pins 4.57.6, which has no Gemma 4;
# 5.25.0 is the version streamq's tests save their tiny models with. torch 2.13.0: the CPU build.
"$PY" -m pip install -q torch==2.13.0 transformers==5.25.0 tokenizers==0.23.3 safetensors==0.8.0 \
    numpy==2.4.6 sentencepiece==0.2.1 "protobuf>=4.21.0,<5.0.0" jinja2 pytest
"$PY" -m pip install -q "$LLAMA/gguf-py"               # the vendored gguf-py (PyPI gguf 0.19.0 lacks what the converter uses)
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q "$DEST/src/$SDIST"
stamp "python packages installed"

# llama.cpp from the vendored sources: libllama (for llama_cpp), llama-quantize and llama-gguf-split.
# GGML_NATIVE=OFF: a portable build (a cached venv may move to another CPU); the quantizers live in
# ggml-base, which gets no -march flags either way, so this does not change the bytes they write.
BUILD="$DEST/llama.cpp-build"
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$BUILD.configure.log"
stamp "configured"
cmake --build "$BUILD" -j "$JOBS" --target llama >"$BUILD.llama.log"
stamp "libllama built"
cmake --build "$BUILD" -j "$JOBS" --target llama-quantize llama-gguf-split >"$BUILD.tools.log"
stamp "llama-quantize and llama-gguf-split built"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"] + "/llama_cpp")')
mkdir -p "$SITE/lib"
cp -a "$BUILD"/bin/lib*.so* "$SITE/lib/"
"$PY" - <<'EOF'
import llama_cpp, gguf, torch, transformers
print("llama_cpp", llama_cpp.__version__, "| gguf", gguf.__file__, "| torch", torch.__version__,
      "| transformers", transformers.__version__)
assert llama_cpp.llama_supports_mmap() is not None
EOF
"$BUILD/bin/llama-gguf-split" --help >/dev/null 2>&1 || [ $? -eq 1 ]
"$BUILD/bin/llama-quantize" --help >/dev/null 2>&1 || [ $? -eq 1 ]
echo "$RECIPE" >"$DEST/.gguf-reference-ready"
stamp "done"
