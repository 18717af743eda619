"""The model card of the 4-bit repo: Hub metadata that links it to its base model, and how to load it."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .plan import Plan


def render_model_card(plan: Plan, repo_name: str, source_card: str | None, output_bytes: int) -> str:
    """A README.md with `base_model` + `base_model_relation: quantized`; the source card's text follows."""
    settings = plan.settings
    license_ = None
    body = ""
    if source_card:
        card = ModelCard(source_card, ignore_metadata_errors=True)
        license_ = card.data.get("license")
        body = card.text.strip()
    is_hub = plan.revision is not None
    data = ModelCardData(
        base_model=plan.source if is_hub else None,
        base_model_relation="quantized" if is_hub else None,
        library_name="transformers",
        license=license_,
        tags=["bitsandbytes", "4-bit", settings.quant_type, "streamq"],
    )
    ratio = plan.input_bytes / output_bytes if output_bytes else 0.0
    origin = f"[{plan.source}](https://huggingface.co/{plan.source}) at commit `{plan.revision}`" if is_hub else f"`{plan.source}`"
    text = f"""---
{data.to_yaml()}
---

# 4-bit ({settings.quant_type.upper()}) bitsandbytes version of {plan.source}

Quantized from {origin} with [streamq](https://pypi.org/project/streamq/), shard by shard. The weights are
the same bytes `transformers` + `bitsandbytes` would write for
`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` followed by `save_pretrained`.

| setting | value |
| --- | --- |
| quant_type | `{settings.quant_type}` |
| double quant | `{settings.double_quant}` |
| blocksize | `{settings.blocksize}` |
| compute dtype | `{settings.compute_dtype}` |
| model dtype | `{plan.tensors.dtype}` |
| kept in full precision | {", ".join(f"`{m}`" for m in settings.skip_modules) if settings.skip_modules else "transformers' defaults (lm_head, tied weights, keep-in-fp32 modules)"} |
| size | {plan.input_bytes / 1e9:.2f} GB -> {output_bytes / 1e9:.2f} GB ({ratio:.2f}x smaller) |

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_name}")  # the 4-bit config is in config.json
```

Needs `bitsandbytes` and `accelerate` installed.
"""
    if plan.left_out:
        text += "\n## Files of the source repo not in this one\n\n" + "".join(
            f"- `{name}`: {reason}\n" for name, reason in plan.left_out.items()
        )
    if body:
        text += f"\n## Original model card\n\n{body}\n"
    return text
