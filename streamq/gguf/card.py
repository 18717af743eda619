"""The model card of a GGUF repo: Hub metadata linking it to its base model, and how to run it with
llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .llama_cpp import LLAMA_CPP_COMMIT
from .plan import GgufPlan
from .qat import grid_line


def render_gguf_card(plan: GgufPlan, repo_name: str, source_card: str | None, output_bytes: int, stats: dict[str, int]) -> str:
    quant = plan.settings.quant_type.upper()
    license_, body = None, ""
    if source_card:
        card = ModelCard(source_card, ignore_metadata_errors=True)
        license_ = card.data.get("license")
        body = card.text.strip()
    is_hub = plan.revision is not None
    data = ModelCardData(
        base_model=plan.source if is_hub else None, base_model_relation="quantized" if is_hub else None,
        license=license_, tags=["gguf", "llama.cpp", "streamq"],
    )
    origin = f"[{plan.source}](https://huggingface.co/{plan.source}) at commit `{plan.revision}`" if is_hub else f"`{plan.source}`"
    files = "".join(f"| `{f.name}` | {f.size / 1e9:.2f} GB |\n" for f in plan.out_files)
    types = ", ".join(f"{n} {name}" for name, n in plan.type_counts().items())
    first = plan.out_files[0].name
    grid = grid_line(stats)
    ratio = plan.input_bytes / output_bytes if output_bytes else 0.0
    made_by = ("`convert_hf_to_gguf.py --outtype " + plan.settings.quant_type + "`") if quant in ("BF16", "F16", "Q8_0") else (
        f"`convert_hf_to_gguf.py --outtype bf16` followed by `llama-quantize ... {quant}`")
    text = f"""---
{data.to_yaml()}
---

# {quant} GGUF of {plan.source}

Converted from {origin} with [streamq](https://pypi.org/project/streamq/), tensor by tensor: the files are
byte for byte what llama.cpp ({LLAMA_CPP_COMMIT}) writes with {made_by}{" (but for Q4_0 groups kept on a QAT grid, below)" if grid and stats.get("q4_0_groups_kept_from_grid") else ""}{", split as `llama-gguf-split --split` splits" if len(plan.out_files) > 1 else ""}.

| | |
| --- | --- |
| type | {quant} (llama.cpp's default per-tensor mixture: {types}) |
| size | {plan.input_bytes / 1e9:.2f} GB -> {output_bytes / 1e9:.2f} GB ({ratio:.2f}x smaller) |
{f"| QAT grid | {grid} |{chr(10)}" if grid else ""}
| file | size |
| --- | --- |
{files}
## How to run

llama.cpp (the first file is enough: it finds the others)

```bash
llama-cli -hf {repo_name}:{quant}
# or, downloaded: llama-cli -m {first}
```

Ollama

```bash
ollama run hf.co/{repo_name}:{quant}
```

LM Studio: search for `{repo_name}` in the Discover tab, or `lms get {repo_name}`.
"""
    if plan.left_out:
        text += "\n## Files of the source repo not in this one\n\n" + "".join(f"- `{n}`: {r}\n" for n, r in plan.left_out.items())
    if body:
        text += f"\n## Original model card\n\n{body}\n"
    return text
