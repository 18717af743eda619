"""GGUF for llama.cpp, Ollama and LM Studio: llama.cpp's converter planned from headers, its files written as
the tensors arrive (plan -> stream -> card); see llama_cpp.py for where llama.cpp's code comes from."""

from __future__ import annotations

from ..settings import GGUF_CONVERTER_TYPES, QuantSettings
from .card import render_gguf_card
from .llama_cpp import converter, libraries
from .plan import GgufPlan, build_gguf_plan
from .stream import gguf_stream


def check_available(settings: QuantSettings) -> None:
    """Say a missing piece of llama.cpp before anything is planned or created."""
    if settings.quant_type not in GGUF_CONVERTER_TYPES:
        libraries()
    converter()


__all__ = ["GgufPlan", "build_gguf_plan", "check_available", "gguf_stream", "render_gguf_card"]
