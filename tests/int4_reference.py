"""Run llm-compressor's model_free_ptq W4A16 (round to nearest) on a checkpoint: the int4 reference.

Runs in the reference virtualenv (llm-compressor pins its own transformers and compressed-tensors),
called by tests/test_int4.py as `python int4_reference.py SRC DST GROUP_SIZE [IGNORE...]`.
"""

import sys

from compressed_tensors.quantization import preset_name_to_scheme
from llmcompressor import model_free_ptq

src, dst, group_size, ignore = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
scheme = preset_name_to_scheme("W4A16", ["Linear"])
scheme.weights.group_size = group_size
model_free_ptq(src, dst, scheme=scheme, ignore=ignore, device="cpu")
