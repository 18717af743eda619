"""Quantize one shard's tensors exactly as the output format's reference tool would (see `converters`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from .arrival import Arrival, Restarted
from .converters import Stats, converter_for
from .plan import Plan, ShardPlan
from .read import ShardReader
from .settings import QuantSettings
from .targets import FLOAT_CODES, TensorRule

logger = logging.getLogger(__name__)


def quantize_shard(arrival: Arrival, shard: ShardPlan, plan: Plan, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
    """Return the output tensors of one shard, keyed by the names transformers would save; the
    converter adds what it counts (e.g. grid-exact groups) to `stats`.

    Tensors are quantized in file order as their bytes arrive, so the work ends soon after the
    download does; memory holds the output shard and one input tensor, never the input shard. A
    download that starts over (see `Arrival`) is quantized again from the start.
    """
    while True:
        try:
            counted: Stats = Counter()
            out = _quantize_tensors(ShardReader(arrival, shard.name, shard.size, plan.stored_info), shard.keys, plan, device, counted)
            if stats is not None:
                stats.update(counted)
            return out
        except Restarted:
            logger.info("%s: its download started over; quantizing it again from the start", shard.name)


def _quantize_tensors(reader: ShardReader, keys: tuple[str, ...], plan: Plan, device: str, stats: Stats) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in reader.in_file_order(keys, {k: t.parts for k, t in plan.logical.items()}):
        rule = plan.rules[key]
        if rule.action == "drop":
            continue
        if rule.action == "keep":
            tensor = _dequantized(reader, key, plan) if key in plan.logical else reader.get_tensor(key)
            out[rule.out_key] = _converted(tensor, rule).contiguous()
            continue
        with _weight(reader, key, plan) as tensor:  # nothing below keeps a view of it
            weight = _converted(tensor, rule)
            weight = weight.T if rule.transpose else weight
            for suffix, value in quantize_weight(weight.contiguous(), plan.settings, device, stats).items():
                out[f"{rule.out_key}{suffix}"] = value
            del tensor, weight
    return out


@contextmanager
def _weight(reader: ShardReader, key: str, plan: Plan) -> Iterator[torch.Tensor]:
    """A weight to quantize: dequantized if the source is quantized, else mapped from the file."""
    if key in plan.logical:
        yield _dequantized(reader, key, plan)
        return
    with reader.mapped_tensor(key) as tensor:
        yield tensor


def _dequantized(reader: ShardReader, key: str, plan: Plan) -> torch.Tensor:
    """One logical tensor of a quantized source, from its stored parts (mapped only while it is computed):
    memory holds the quantized weight's pages, its scales and the full-precision result, one tensor at a time."""
    tensor = plan.logical[key]
    assert plan.dequantizer is not None
    with ExitStack() as stack:
        parts = {part: stack.enter_context(reader.mapped_tensor(part)) for part in tensor.parts}
        return plan.dequantizer.dequantize(tensor, parts, getattr(torch, FLOAT_CODES[tensor.info.dtype])).contiguous()


def _converted(tensor: torch.Tensor, rule: TensorRule) -> torch.Tensor:
    return tensor if rule.dtype is None else tensor.to(getattr(torch, rule.dtype))


def warm_up(plan: Plan, device: str) -> None:
    """Quantize a small weight in each dtype the plan quantizes, so that loading the compiled kernel,
    checking it against bitsandbytes and starting CUDA happen while the first shard downloads."""
    dtypes = {
        rule.dtype or FLOAT_CODES.get(plan.tensor_info[key].dtype)
        for key, rule in plan.rules.items() if rule.action == "quantize" and key in plan.tensor_info
    }
    converter = converter_for(plan.settings)
    for dtype in sorted(d for d in dtypes if d is not None):
        quantize_weight(converter.warm_up_weight(getattr(torch, dtype)), plan.settings, device)


def quantize_weight(weight: torch.Tensor, settings: QuantSettings, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
    """The tensors written for one weight, keyed by suffix, by the output format's converter."""
    return converter_for(settings).quantize_weight(weight, device, stats)
