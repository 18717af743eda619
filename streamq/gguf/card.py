"""The model card of a GGUF repo: Hub metadata linking it to its base model, and how to run it with
llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

from ..modelcard import card_tail, front_matter, origin
from .llama_cpp import LLAMA_CPP_COMMIT
from .plan import GgufPlan
from .qat import grid_line


def render_gguf_card(plan: GgufPlan, repo_name: str, source_card: str | None, output_bytes: int, stats: dict[str, int]) -> str:
    quant = plan.settings.quant_type.upper()
    front, body = front_matter(plan, source_card, ["gguf", "llama.cpp", "streamq"])
    files = "".join(f"| `{f.name}` | {f.size / 1e9:.2f} GB |\n" for f in plan.out_files)
    types = ", ".join(f"{n} {name}" for name, n in plan.type_counts().items())
    model, mmproj = plan.sets[0], plan.mmproj
    first = model.files[0].name
    grid = grid_line(stats)
    ratio = plan.input_bytes / output_bytes if output_bytes else 0.0
    made_by = model.made_by + (f", and the projector `{mmproj.files[0].name}` with {mmproj.made_by}" if mmproj else "")
    split = len(model.files) > 1
    text = f"""{front}

# {quant} GGUF of {plan.source}

Converted from {origin(plan)} with [streamq](https://pypi.org/project/streamq/), tensor by tensor: the files are
byte for byte what llama.cpp ({LLAMA_CPP_COMMIT}) writes with {made_by}{" (but for Q4_0 groups kept on a QAT grid, below)" if grid and stats.get("q4_0_groups_kept_from_grid") else ""}{", split as `llama-gguf-split --split` splits" if split else ""}.

| | |
| --- | --- |
| type | {quant} (llama.cpp's default per-tensor mixture: {types}) |
| size | {plan.input_bytes / 1e9:.2f} GB -> {output_bytes / 1e9:.2f} GB ({ratio:.2f}x smaller) |
{f"| QAT grid | {grid} |{chr(10)}" if grid else ""}{_mmproj_row(mmproj)}
| file | size |
| --- | --- |
{files}
## How to run

llama.cpp ({_first_file_line(split, mmproj)})

```bash
llama-cli -hf {repo_name}:{quant}
# or, downloaded: llama-cli -m {first}{f" --mmproj {mmproj.files[0].name}" if mmproj else ""}
```
{_mmproj_run(repo_name, quant, first, mmproj)}
Ollama

```bash
ollama run hf.co/{repo_name}:{quant}
```

LM Studio: search for `{repo_name}` in the Discover tab, or `lms get {repo_name}`.
"""
    if plan.warnings:  # source tensors llama.cpp's converter writes to neither file, and why
        text += "\n## Not converted\n\n" + "".join(f"- {w}\n" for w in plan.warnings)
    return text + card_tail(plan.left_out, body)


def _first_file_line(split: bool, mmproj) -> str:
    if mmproj is None:
        return "the first file is enough: it finds the others"
    return "`-hf` fetches the projector too; downloaded, give the model's " + ("first file (it finds the others)" if split else "file") + " and the projector"


def _mmproj_row(mmproj) -> str:
    if mmproj is None:
        return ""
    types = ", ".join(f"{n} {name}" for name, n in mmproj.type_counts().items())
    return f"| projector | `{mmproj.files[0].name}`, {mmproj.quant_type.upper()} ({types}): the vision/audio encoder, for llama.cpp's `--mmproj` |\n"


def _mmproj_run(repo_name: str, quant: str, first: str, mmproj) -> str:
    """Images and audio: llama.cpp's multimodal tools load the model with its projector."""
    if mmproj is None:
        return ""
    return f"""
Images and audio (llama.cpp's multimodal tools: the model with its `--mmproj` projector)

```bash
llama-mtmd-cli -hf {repo_name}:{quant}
# or, downloaded: llama-mtmd-cli -m {first} --mmproj {mmproj.files[0].name} --image photo.jpg -p "Describe this image."
llama-server -m {first} --mmproj {mmproj.files[0].name}
```
"""
