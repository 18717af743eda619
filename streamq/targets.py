"""Decide, tensor by tensor, what the reference tool would do with a checkpoint when it quantizes to 4 bit.

The answer comes from transformers itself: the model is built on the meta device from config.json
(no memory), the output format's converter marks the layers its reference quantizes (for
bitsandbytes, transformers' own quantizer replaces its Linear layers), and transformers' own
key-renaming rules map checkpoint keys to model parameters and back to the names it saves.
Only when transformers cannot build the model does a name/shape rule take over, with a warning.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .converters import Converter, converter_for
from .errors import UnsupportedModelError
from .settings import QuantSettings
from .surface import remedy

if TYPE_CHECKING:
    import torch


Action = Literal["quantize", "keep", "drop"]


@dataclass(frozen=True)
class TensorRule:
    """What happens to one checkpoint tensor."""

    action: Action
    out_key: str
    dtype: str | None  # torch dtype name to cast to, None = leave as stored
    transpose: bool = False  # Conv1D weights are stored [in, out]
    reason: str = ""


@dataclass(frozen=True)
class TensorPlan:
    """The per-tensor decisions for a whole checkpoint."""

    rules: dict[str, TensorRule]
    dtype: str  # the model dtype transformers loads in
    total_parameters: int  # what save_pretrained writes as index metadata
    warnings: list[str]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]


TensorReader = Callable[[list[str]], "dict[str, torch.Tensor]"]  # checkpoint keys -> their stored tensors

FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def resolve_dtype(config: dict[str, Any], first_shard: dict[str, TensorInfo], index_metadata: dict[str, Any] | None) -> str:
    """The dtype `from_pretrained(dtype="auto")` loads in, by transformers' rule (`modeling_utils._get_dtype`).

    The config's dtype, else the index metadata's, else the first floating tensor of the first shard
    file in its sorted key order (not of the whole checkpoint: a mixed-dtype checkpoint differs).
    """
    import torch
    from transformers.modeling_utils import get_state_dict_dtype, str_to_torch_dtype

    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value != "auto":
            return value
    if isinstance(index_metadata, dict) and isinstance(index_metadata.get("dtype"), str):
        return index_metadata["dtype"]
    meta = {k: torch.empty(0, dtype=str_to_torch_dtype[first_shard[k].dtype], device="meta") for k in sorted(first_shard)}
    dtype = get_state_dict_dtype(meta)
    return str(dtype).removeprefix("torch.") if dtype.is_floating_point else "float32"


def plan_tensors(
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    settings: QuantSettings,
    *,
    first_shard: dict[str, TensorInfo],
    read_tensors: TensorReader,
    index_metadata: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    model_dir: str | None = None,
) -> TensorPlan:
    """Decide every checkpoint key's fate as `from_pretrained(load_in_4bit)` + `save_pretrained` would.

    `first_shard` (the header of the first weight file) and `index_metadata` decide the load dtype
    when config.json does not name one. `read_tensors` (checkpoint keys -> tensors) is called only
    when a checkpoint stores both ends of a tied weight: transformers ties them only if they are equal.
    """
    dtype = resolve_dtype(config, first_shard, index_metadata)
    try:
        converter = converter_for(settings)
        model, quantizer = _build_meta_model(config, converter, dtype, trust_remote_code, model_dir)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # transformers cannot build it: fall back, loudly
        message = (
            f"transformers could not build {config.get('architectures') or config.get('model_type')!r} "
            f"({type(exc).__name__}: {exc}); falling back to a name/shape rule (2-D '*.weight' tensors "
            "outside embeddings, norms and lm_head are quantized). Check the output before relying on it."
        )
        warnings.warn(message, stacklevel=2)
        rules = _fallback_rules(tensors, settings, dtype)
        count = sum(_numel(tensors[k].shape) for k, r in rules.items() if r.action != "drop" and r.dtype)
        return TensorPlan(rules, dtype, count, [message])
    rules = _rules_from_model(model, converter, quantizer, tensors, dtype, read_tensors)
    return TensorPlan(rules, dtype, model.num_parameters(), [])  # counted once tied, as save_pretrained does


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _build_meta_model(
    config_dict: dict[str, Any],
    converter: Converter,
    dtype: str,
    trust_remote_code: bool,
    model_dir: str | None,
) -> tuple[Any, Any]:
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.utils import ContextManagers

    if config_dict.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            "this model ships custom code (auto_map in config.json); streamq does not run code from the "
            f"source repo: review it, then {remedy('trust_remote_code')}"
        )
    if model_dir is not None:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    else:
        config_dict = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
        config = AutoConfig.for_model(**config_dict)
    model_class = _model_class(config, transformers, trust_remote_code)
    quantizer = converter.make_quantizer()
    torch_dtype = getattr(torch, dtype)
    # The same init context from_pretrained uses (meta device, default dtype), around the same two steps.
    contexts = model_class.get_init_context(torch_dtype, True, False, None)
    with ContextManagers(contexts), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(copy.deepcopy(config))
        converter.prepare_meta_model(model, quantizer, torch_dtype)
    return model, quantizer


def _model_class(config: Any, transformers: Any, trust_remote_code: bool) -> Any:
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if trust_remote_code and getattr(config, "auto_map", None):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        ref = config.auto_map.get("AutoModelForCausalLM") or next(iter(config.auto_map.values()))
        return get_class_from_dynamic_module(ref, config.name_or_path)
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText", "AutoModel"):
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(f"no transformers model class for architectures={config.architectures}")


def _rules_from_model(
    model: Any, output: Converter, quantizer: Any, tensors: dict[str, TensorInfo], dtype: str, read_tensors: TensorReader
) -> dict[str, TensorRule]:
    """Mirror transformers' loading loop (core_model_loading) and save (`save_pretrained`) for each key."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        build_glob_alternation,
        dot_natural_key,
        rename_source_key,
        revert_weight_conversion,
    )
    from transformers.pytorch_utils import Conv1D

    torch_dtype = getattr(torch, dtype)
    meta_state = model.state_dict()
    mapping = get_model_conversion_mapping(model, None, quantizer)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    dtype_plan = model._get_dtype_plan(torch_dtype)
    if dtype_plan:
        dtype_alt, dtype_by_group, _ = build_glob_alternation(list(dtype_plan))
    prefix = model.base_model_prefix

    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    loads: dict[str, str] = {}  # checkpoint key -> the parameter or buffer a plain renaming loads it into
    fused: dict[str, str] = {}  # checkpoint key -> the first parameter a WeightConverter builds from it
    filled: set[str] = set()  # every parameter or buffer the checkpoint fills
    merged: dict[str, list[str]] = {}  # checkpoint key -> quantized parameters a converter splits/fuses it into
    rules: dict[str, TensorRule] = {}
    for key in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if renamed not in meta_state:
            rules[key] = TensorRule("drop", key, None, reason="not a parameter or saved buffer of the model")
            continue
        quantize = output.needs_quantization(model, quantizer, renamed)
        if pattern is None:
            loads[key] = renamed
            filled.add(renamed)
        else:
            fused[key] = renamed
            # As transformers names a converter's targets (see convert_and_load_state_dict_in_model).
            converter = pattern_to_converter[pattern]
            targets = [t for t in (renamed.replace(converter.target_patterns[0], p) for p in converter.target_patterns) if t in meta_state]
            filled.update(targets)
            quantized = [t for t in targets if output.needs_quantization(model, quantizer, t)]
            if quantized:
                merged[key] = quantized
        target = dtype_plan[dtype_by_group[dtype_alt.search(renamed).lastgroup]] if dtype_plan and dtype_alt.search(renamed) else None
        if target is None:
            empty = meta_state[renamed]
            target = empty.dtype if (empty.dtype != torch_dtype and not quantize) else torch_dtype
        cast = str(target).removeprefix("torch.")
        if pattern is not None and output.quantizes_fused_source(model, quantizer, renamed, tensors[key].shape):
            reason = "expert weight transformers fuses on load, quantized under its checkpoint name"
            rules[key] = TensorRule("quantize", key, cast, reason=reason)
        elif quantize:
            module = model.get_submodule(renamed.rsplit(".", 1)[0])
            transpose = issubclass(getattr(module, "source_cls", type(None)), Conv1D)
            rules[key] = TensorRule("quantize", renamed, cast, transpose, output.quantize_reason)
        else:
            rules[key] = TensorRule("keep", key if pattern else renamed, cast, reason=_keep_reason(model, renamed))
    _refuse_merged_quantized(merged)

    saved_as = _tie_and_save(model, loads, filled, rules, read_tensors)
    # The names save_pretrained writes: transformers' own reversal of the renamings it applied.
    model._weight_conversions = [m for m in mapping if m.was_used()]
    probes = {saved_as[p]: torch.empty(0, device="meta") for p in loads.values() if p in saved_as}
    reverted = revert_weight_conversion(model, dict(probes))
    out_name = {id(t): name for name, t in reverted.items()}
    for key, renamed in (loads | fused).items():
        rule = rules[key]
        if renamed not in saved_as:
            rules[key] = TensorRule("drop", key, None, reason=_unsaved_reason(model, renamed))
        elif key in loads:
            name = saved_as[renamed]
            rules[key] = TensorRule(rule.action, out_name.get(id(probes[name]), name), rule.dtype, rule.transpose, rule.reason)
    return rules


def _refuse_merged_quantized(merged: dict[str, list[str]]) -> None:
    """transformers can quantize the layers a converter splits a tensor into, but cannot save them back.

    Its save reverts the split by concatenating the packed 4-bit data *and* the quant states of the
    pieces (three JSON blobs in one tensor, e.g. nomic-bert's Wqkv), which nothing can load; byte
    parity with that would be a broken checkpoint. Keeping those layers unquantized works.
    """
    if not merged:
        return
    key, targets = next(iter(merged.items()))
    more = f" (and {len(merged) - 1} more tensors)" if len(merged) > 1 else ""
    modules = sorted({re.sub(r"^.*\.\d+\.", "", t.rsplit(".", 1)[0]) for ts in merged.values() for t in ts})
    raise UnsupportedModelError(
        f"transformers loads {key}{more} by splitting it into {', '.join(targets)} and quantizes "
        "those, but its save_pretrained merges the packed 4-bit pieces and their quant states back into one tensor that "
        "cannot be loaded; streamq will not write that. Keep those layers unquantized with "
        f"skip_modules={modules} (llm_int8_skip_modules in transformers)"
    )


def _tie_and_save(
    model: Any, loads: dict[str, str], filled: set[str], rules: dict[str, TensorRule], read_tensors: TensorReader
) -> dict[str, str]:
    """Which loaded parameter `save_pretrained` writes under which name, after transformers ties weights.

    Runs transformers' own `tie_weights(missing_keys=...)` on the meta model, as `from_pretrained`
    does after loading: it ties a missing weight to its present partner (either way round), and unties
    a pair the checkpoint stores twice with different values. Only for that comparison are values
    read (cast as they load); every other parameter stays on the meta device. Then transformers' own
    `remove_tied_weights_from_state_dict` picks the one name each shared tensor is saved under.
    """
    import torch
    from transformers.modeling_utils import _load_parameter_into_model, remove_tied_weights_from_state_dict

    loaded = set(loads.values())  # tied weights are loaded by plain renamings, never built by a converter
    tied_groups: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied_groups.setdefault(source, {source}).add(target)
    stored_twice = {name for group in tied_groups.values() if len(group & loaded) > 1 for name in group & loaded}
    key_of = {renamed: key for key, renamed in loads.items()}
    values = read_tensors(sorted(key_of[name] for name in stored_twice)) if stored_twice else {}
    # Loading gives each present weight its own tensor, undoing the tying done at init.
    for name in {n for group in tied_groups.values() for n in group & loaded}:
        empty = model.get_parameter_or_buffer(name)
        value = values[key_of[name]].to(getattr(torch, rules[key_of[name]].dtype)) if name in values else torch.empty_like(empty)
        _load_parameter_into_model(model, name, value)
    loaded_from = {id(model.get_parameter_or_buffer(name)): name for name in filled}

    missing = set(model.state_dict()) - filled
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    _check_missing(model, missing)
    state = model.state_dict()
    for name in model._keys_to_ignore_on_save or []:
        state.pop(name, None)
    saved_as = {}
    for name in remove_tied_weights_from_state_dict(state, model):
        source = loaded_from.get(id(model.get_parameter_or_buffer(name)))
        if source is not None:
            saved_as[source] = name
    return saved_as


def _keep_reason(model: Any, name: str) -> str:
    import torch

    module_name = name.rsplit(".", 1)[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "fused or converted parameter, never quantized"
    if type(module) is torch.nn.Linear:
        return "skipped by transformers (lm_head, tied, keep-in-fp32 or skip_modules)"
    if name.endswith("bias"):
        return "bias"
    return f"{type(module).__name__} is not nn.Linear"


def _unsaved_reason(model: Any, name: str) -> str:
    if name in (model._keys_to_ignore_on_save or []):
        return "in the model's _keys_to_ignore_on_save"
    return "tied to another weight; transformers saves that one"


def _check_missing(model: Any, missing: set[str]) -> None:
    """A parameter the checkpoint lacks would be random-initialised by transformers: refuse instead."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    absent = sorted(params & missing)
    if absent:
        shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise UnsupportedModelError(
            f"the checkpoint lacks {len(absent)} parameter(s) the model needs ({shown}); transformers would fill "
            "them with random values. Check that the source repo is complete (all shards, matching config.json)."
        )


_SKIP_NAMES = re.compile(r"(embed|lm_head|norm|wte|wpe|shared|router|gate\.weight$)", re.IGNORECASE)


def _fallback_rules(tensors: dict[str, TensorInfo], settings: QuantSettings, dtype: str) -> dict[str, TensorRule]:
    skips = tuple(settings.skip_modules or ())
    rules = {}
    for key, info in tensors.items():
        floating = info.dtype in FLOAT_CODES
        quantize = (
            floating
            and key.endswith(".weight")
            and len(info.shape) == 2
            and not _SKIP_NAMES.search(key)
            and not any(s in key for s in skips)
        )
        action: Action = "quantize" if quantize else "keep"
        rules[key] = TensorRule(action, key, dtype if floating else None, reason="name/shape fallback rule")
    return rules
