"""The model card of the 4-bit repo: Hub metadata that links it to its base model, and how to load it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .converters import converter_for
from .plan import Plan


def render_model_card(plan: Plan, repo_name: str, source_card: str | None, output_bytes: int, stats: Counter | None = None) -> str:
    """A README.md with `base_model` + `base_model_relation: quantized`; the source card's text follows.
    `stats` are the run's totals of what the converter counted (e.g. grid-exact groups)."""
    card_text = converter_for(plan.settings).card(stats or Counter())
    front, body = front_matter(plan, source_card, [*card_text.tags, "streamq"], library_name="transformers")
    rows = "".join(f"| {name} | {value} |\n" for name, value in card_text.rows)
    ratio = plan.input_bytes / output_bytes if output_bytes else 0.0
    text = f"""{front}

# {card_text.title} version of {plan.source}

Converted from {origin(plan)} with [streamq](https://pypi.org/project/streamq/), tensor by tensor. {card_text.description}

| setting | value |
| --- | --- |
{rows}| model dtype | `{plan.tensors.dtype}` |
| size | {plan.input_bytes / 1e9:.2f} GB -> {output_bytes / 1e9:.2f} GB ({f"{ratio:.2f}x smaller" if ratio >= 1 or not ratio else f"{1 / ratio:.2f}x larger"}) |

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_name}")  # config.json says how it loads
```

{card_text.loading}
"""
    return text + card_tail(plan.left_out, body)


def front_matter(plan: Any, source_card: str | None, tags: list[str], library_name: str | None = None) -> tuple[str, str]:
    """The card's YAML block (`base_model` + `base_model_relation: quantized` for a Hub source, the source
    card's license) and the source card's text, which the card repeats."""
    license_, body = None, ""
    if source_card:
        card = ModelCard(source_card, ignore_metadata_errors=True)
        license_ = card.data.get("license")
        body = card.text.strip()
    is_hub = plan.revision is not None
    data = ModelCardData(
        base_model=plan.source if is_hub else None,
        base_model_relation="quantized" if is_hub else None,
        library_name=library_name,
        license=license_,
        tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---", body


def origin(plan: Any) -> str:
    """Where the output came from: the Hub repo at its commit, or the local directory."""
    if plan.revision is not None:
        return f"[{plan.source}](https://huggingface.co/{plan.source}) at commit `{plan.revision}`"
    return f"`{plan.source}`"


def card_tail(left_out: dict[str, str], body: str) -> str:
    """What of the source repo is not in the output, then the source card's text."""
    text = ""
    if left_out:
        text += "\n## Files of the source repo not in this one\n\n" + "".join(f"- `{name}`: {reason}\n" for name, reason in left_out.items())
    if body:
        text += f"\n## Original model card\n\n{body}\n"
    return text
