"""Read GGUF files in the GGUF reference virtualenv and print what the tests check, as one JSON object.

    python gguf_inspect.py read FILE...         per file: KV keys in order (values of the small ones),
                                                 tensors in order (name, type, shape, sha256 of the data)
    python gguf_inspect.py logits FILE TOKENS   llama-cpp-python loads FILE (a split model: its first file)
                                                 and evaluates TOKENS (comma-separated ids): every position's logits

Called by subprocess from tests/test_gguf_reference.py (streamq's own venv has no gguf package).
"""

from __future__ import annotations

import hashlib
import json
import sys


def read(paths: list[str]) -> list[dict]:
    import gguf

    files = []
    for path in paths:
        reader = gguf.GGUFReader(path)
        kv = []
        for field in reader.fields.values():
            value = None
            if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY:
                value = field.contents()
            elif field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
                value = f"array[{len(field.data)}]"
            kv.append([field.name, value])
        tensors = [
            dict(name=t.name, type=t.tensor_type.name, shape=[int(x) for x in t.shape],
                 offset=int(t.data_offset), sha256=hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in reader.tensors
        ]
        files.append(dict(path=path, kv=kv, tensors=tensors))
    return files


def logits(path: str, tokens: list[int]) -> dict:
    import llama_cpp

    model = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False, seed=0)
    model.eval(tokens)
    n_vocab = model.n_vocab()
    return dict(n_vocab=n_vocab, logits=[[float(x) for x in row] for row in model.scores[: len(tokens)]])


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "read":
        print(json.dumps(read(args)))
    elif command == "logits":
        print(json.dumps(logits(args[0], [int(x) for x in args[1].split(",")])))
    else:
        raise SystemExit(f"unknown command {command}")
