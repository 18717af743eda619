"""Decide, tensor by tensor, what transformers would do with a checkpoint when it quantizes to 4 bit.

The answer comes from transformers itself: the model is built on the meta device from config.json
(no memory), transformers' own bitsandbytes quantizer replaces its Linear layers, and transformers'
own key-renaming rules map checkpoint keys to model parameters and back to the names it saves.
Only when transformers cannot build the model does a name/shape rule take over, with a warning.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UnsupportedModelError
from .settings import QuantSettings

logger = logging.getLogger(__name__)

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


FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def resolve_dtype(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> str:
    """The dtype `from_pretrained(dtype="auto")` loads in: the config's, else the checkpoint's first float."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value != "auto":
            return value
    for key in sorted(tensors):
        code = tensors[key].dtype
        if code in FLOAT_CODES:
            return FLOAT_CODES[code]
    return "float32"


def plan_tensors(
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    settings: QuantSettings,
    *,
    trust_remote_code: bool = False,
    model_dir: str | None = None,
) -> TensorPlan:
    """Decide every checkpoint key's fate as `from_pretrained(load_in_4bit)` + `save_pretrained` would."""
    dtype = resolve_dtype(config, tensors)
    try:
        model, quantizer = _build_meta_model(config, settings, dtype, trust_remote_code, model_dir)
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
    return TensorPlan(_rules_from_model(model, quantizer, tensors, dtype), dtype, model.num_parameters(), [])


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _build_meta_model(
    config_dict: dict[str, Any],
    settings: QuantSettings,
    dtype: str,
    trust_remote_code: bool,
    model_dir: str | None,
) -> tuple[Any, Any]:
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.quantizers import AutoHfQuantizer
    from transformers.utils import ContextManagers

    if config_dict.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            "this model ships custom code (auto_map in config.json); streamq does not run code from the "
            "source repo unless you pass trust_remote_code=True (--trust-remote-code) after reviewing it"
        )
    if model_dir is not None:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    else:
        config_dict = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
        config = AutoConfig.for_model(**config_dict)
    model_class = _model_class(config, transformers, trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(settings.bnb_config(), pre_quantized=False)
    torch_dtype = getattr(torch, dtype)
    # The same init context from_pretrained uses (meta device, default dtype), around the same two steps.
    contexts = model_class.get_init_context(torch_dtype, True, False, None)
    with ContextManagers(contexts), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(copy.deepcopy(config))
        quantizer.preprocess_model(model=model, dtype=torch_dtype, device_map={"": "cpu"}, checkpoint_files=None)
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


def _rules_from_model(model: Any, quantizer: Any, tensors: dict[str, TensorInfo], dtype: str) -> dict[str, TensorRule]:
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
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
    ignored_on_save = set(model._keys_to_ignore_on_save or [])
    prefix = model.base_model_prefix

    model_keys: dict[str, str] = {}
    loaded: set[str] = set()
    rules: dict[str, TensorRule] = {}
    for key in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if renamed not in meta_state:
            rules[key] = TensorRule("drop", key, None, reason="not a parameter or saved buffer of the model")
            continue
        loaded.add(renamed)
        if renamed in tied_targets or renamed in ignored_on_save:
            rules[key] = TensorRule("drop", key, None, reason="tied to another weight; transformers does not save it")
            continue
        quantize = quantizer.param_needs_quantization(model, renamed)
        target = dtype_plan[dtype_by_group[dtype_alt.search(renamed).lastgroup]] if dtype_plan and dtype_alt.search(renamed) else None
        if target is None:
            empty = meta_state[renamed]
            target = empty.dtype if (empty.dtype != torch_dtype and not quantize) else torch_dtype
        cast = str(target).removeprefix("torch.")
        if quantize:
            module = model.get_submodule(renamed.rsplit(".", 1)[0])
            transpose = issubclass(getattr(module, "source_cls", type(None)), Conv1D)
            rules[key] = TensorRule("quantize", renamed, cast, transpose, "nn.Linear replaced by Linear4bit")
        else:
            rules[key] = TensorRule("keep", key if pattern else renamed, cast, reason=_keep_reason(model, renamed))
        if pattern is None:
            model_keys[key] = renamed

    # The names save_pretrained writes: transformers' own reversal of the renamings it applied.
    model._weight_conversions = [m for m in mapping if m.was_used()]
    probes = {model_keys[k]: torch.empty(0, device="meta") for k in model_keys}
    reverted = revert_weight_conversion(model, dict(probes))
    out_name = {id(t): name for name, t in reverted.items()}
    for key, renamed in model_keys.items():
        rule = rules[key]
        rules[key] = TensorRule(rule.action, out_name.get(id(probes[renamed]), renamed), rule.dtype, rule.transpose, rule.reason)

    _check_missing(model, loaded, tied_targets)
    return rules


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


def _check_missing(model: Any, loaded: set[str], tied: set[str]) -> None:
    """A parameter the checkpoint lacks would be random-initialised by transformers: refuse instead."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(params - loaded - tied)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UnsupportedModelError(
            f"the checkpoint lacks {len(missing)} parameter(s) the model needs ({shown}); transformers would fill "
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
