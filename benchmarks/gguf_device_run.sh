#!/bin/bash
# How the GPU-machine runs of issue 27 were to be made (the `run` tool sends the session checkout, /work/main):
# copy this branch (git archive HEAD streamq benchmarks tests/gguf_cases.py tests/int4_cases.py) to .bench27/wt, and into
# .bench27: site/{llama_cpp,diskcache} (from the venv), whl/sentencepiece-0.2.1-cp312-*.whl, llama.cpp/ (the converter
# tree ~/.cache/streamq/llama.cpp-0c1e57098), bin/ (llama-quantize and its .so files); carry [".bench27"], then:
#   T1=300 T2=210 L2=8 bash .bench27/both.sh
# ---- .bench27/env.sh
# B=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/whl/*.whl >/dev/null 2>&1 || echo "pip failed"
# cp -r $B/site/* /tmp/site/
# export PYTHONPATH=/tmp/site STREAMQ_LLAMA_CPP=$B/llama.cpp LLAMA_QUANTIZE=$B/bin/llama-quantize LD_LIBRARY_PATH=$B/bin
# export STREAMQ_BENCH_COMMIT=b231765 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_XET=1
# GEMMA="--hidden 5376 --intermediate 21504 --vocab 262144 --heads 32 --kv-heads 16 --head-dim 256 --tie-embeddings --source-direct --sparse --bandwidth-mbps 1000 --no-unthrottled --calibration-rounds 2"
# ---- .bench27/both.sh
# one command: the 60-layer Gemma 4 31B shape (raw, streamq q4_k_m, q4_0), then llama.cpp's route beside streamq at 8 layers
source .bench27/env.sh; cd .bench27/wt
python3 -c "import llama_cpp, sentencepiece, diskcache; print('llama_cpp', llama_cpp.__version__)" || exit 3
nproc; df -h / /tmp /dev/shm | cat; free -g | head -2; nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${T1:-330} python3 benchmarks/bench_pipeline.py $GEMMA --layers 60 --shard-mb 50000 --hub-dir /dev/shm/hub60 --scenarios raw,gguf_q4_k_m,gguf_q4_0 --shapes-from gguf_q4_k_m --calibration-rounds 1 --json $OUT/gguf_pipeline_gemma31b.json > $OUT/gguf_pipeline_gemma31b.log 2>&1
echo rc1 $?; rm -rf /dev/shm/hub60; df -h /tmp | cat
timeout ${T2:-230} python3 benchmarks/bench_pipeline.py $GEMMA --layers ${L2:-8} --shard-mb 50000 --hub-dir /dev/shm/hubs --scenarios ${S2:-raw,llamacpp_q4_k_m,gguf_q4_k_m,llamacpp_q4_0,gguf_q4_0} --shapes-from gguf_q4_k_m --calibration-rounds 1 --json $OUT/gguf_llamacpp_small.json > $OUT/gguf_llamacpp_small.log 2>&1
echo rc2 $?; grep -v "^\s*$" $OUT/gguf_pipeline_gemma31b.log | tail -25; grep -v "^\s*$" $OUT/gguf_llamacpp_small.log | tail -25; df -h /tmp | cat
