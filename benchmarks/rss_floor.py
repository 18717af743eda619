"""Where streamq's resident memory goes before its first shard: the floor under every peak-RSS figure.

Each step below runs cumulatively in one fresh interpreter, and its VmRSS (anonymous and file-backed) is
printed after it. On a GPU machine the CUDA steps run too. Nothing here is timed work: it shows what
a run pays for its imports and device context, which no shard size changes.

    python benchmarks/rss_floor.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

STEPS = {
    "import torch": "import torch",
    "import huggingface_hub, safetensors": "import huggingface_hub, safetensors",
    "import bitsandbytes": "from streamq.bnb import bitsandbytes_functional; bitsandbytes_functional()",
    "import streamq": "import streamq, streamq.pipeline",
    "transformers' bnb integration + llama": "import transformers.integrations.bitsandbytes, transformers.models.llama.modeling_llama",
    "CUDA context": "torch.zeros(1, device='cuda'); torch.cuda.synchronize()",
    "bnb quantize_4bit on CUDA": (
        "import bitsandbytes.functional as F; F.quantize_4bit(torch.randn(4096, 4096, dtype=torch.bfloat16, device='cuda'),"
        " blocksize=64, compress_statistics=True, quant_type='nf4'); torch.cuda.synchronize()"
    ),
}
CUDA_STEPS = ("CUDA context", "bnb quantize_4bit on CUDA")

CHILD = r"""
import json, sys, time
def status():
    fields = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'RssAnon', 'RssFile'):
            fields[key] = int(value.split()[0]) * 1024
    return fields
out = []
for name, code in json.loads(sys.argv[1]):
    started = time.perf_counter()
    exec(code, globals())
    out.append({'step': name, 'seconds': time.perf_counter() - started, 'modules': len(sys.modules),
                'triton_loaded': 'triton' in sys.modules, 'torch_inductor_loaded': 'torch._inductor' in sys.modules, **status()})
print(json.dumps(out))
"""


def main() -> None:
    import torch  # only to see whether this machine has CUDA

    steps = [(name, code) for name, code in STEPS.items() if torch.cuda.is_available() or name not in CUDA_STEPS]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(steps)], check=True, capture_output=True, text=True,
                          cwd=REPO_ROOT)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'step':40} {'RSS MB':>8} {'anon':>8} {'file':>8} {'+RSS':>8} {'s':>6}  modules  triton inductor")
    last = 0
    for r in rows:
        print(f"{r['step']:40} {r['VmRSS'] / 1e6:8.0f} {r['RssAnon'] / 1e6:8.0f} {r['RssFile'] / 1e6:8.0f} "
              f"{(r['VmRSS'] - last) / 1e6:8.0f} {r['seconds']:6.2f}  {r['modules']:7d}  {r['triton_loaded']!s:6} {r['torch_inductor_loaded']}")
        last = r["VmRSS"]


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.1f} s)")
