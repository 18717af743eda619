"""What a plan or a manifest says, as data for `--json` and as text for people."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .converters import converter_for
from .manifest import Manifest, stats_total
from .budget import pools
from .plan import Plan
from .settings import BNB_TYPES


def plan_summary(plan: Plan, *, downloads: bool) -> dict[str, Any]:
    """Source files and output shards, tensor decisions with reasons, expected sizes and the disk a run needs."""
    rules = plan.rules
    shards = []
    for shard in plan.shards:
        actions = Counter(rules[k].action for k in shard.keys)
        shards.append({"name": shard.name, "input_bytes": shard.size, **{a: actions[a] for a in ("quantize", "keep", "drop")}})
    outputs = [{"name": o.name, "expected_bytes": o.expected_size, "tensors": len(o.items)} for o in plan.outputs]
    out_total = sum(o.expected_size for o in plan.outputs)
    window, output = pools(plan.largest_tensor(), plan.output_pair(), downloads)
    warnings = list(plan.warnings)
    tied = sorted(k for k, r in rules.items() if r.action == "drop" and "tied" in r.reason)
    if tied:
        warnings.append(f"tied weights are not written again: {', '.join(tied)}")
    return {
        "source": plan.source,
        "revision": plan.revision,
        "model_dtype": plan.tensors.dtype,
        "source_quantization": plan.dequantizer.method if plan.dequantizer else None,  # dequantized as it streams
        "dequantized_tensors": len(plan.logical),
        "settings": plan.settings.as_dict(),
        "shards": shards,
        "outputs": outputs,
        "tensors": {
            action: sum(1 for r in rules.values() if r.action == action) for action in ("quantize", "keep", "drop")
        },
        "reasons": dict(Counter(f"{r.action}: {r.reason}" for r in rules.values()).most_common()),
        "input_bytes": plan.input_bytes,
        "expected_output_bytes": out_total,
        "compression_ratio": plan.input_bytes / out_total if out_total else 0.0,
        "largest_tensor_bytes": plan.largest_tensor(),
        "disk_needed_bytes": max(window + output, plan.carried_bytes if downloads else 0),
        "disk_least_bytes": (plan.largest_tensor() if downloads else 0) + output,
        "disk_counted": _disk_counted(downloads, window + output, plan.carried_bytes),
        "files": {name: {"action": d.action, "reason": d.reason} for name, d in plan.files.items()},
        "carried_files": plan.extra_files,
        "left_out_files": plan.left_out,
        "warnings": warnings,
        "note": converter_for(plan.settings).plan_note(),
    }


def gguf_plan_summary(plan: Any, *, downloads: bool) -> dict[str, Any]:
    """A GGUF plan (gguf/plan.py): the files llama.cpp's tools would write, and each tensor type's count."""
    outputs = [{"name": o.name, "expected_bytes": o.expected_size, "tensors": len(o.items)} for o in plan.outputs]
    out_total = sum(o.expected_size for o in plan.outputs)
    window, output = pools(plan.largest_tensor(), plan.output_pair(), downloads)
    quantized, kept = plan.tensor_counts()
    return {
        "source": plan.source,
        "revision": plan.revision,
        "format": "gguf",
        "architecture": plan.model.arch,
        "settings": plan.settings.as_dict(),
        "shards": [{"name": s.name, "input_bytes": s.size} for s in plan.shards],
        "outputs": outputs,
        "tensors": {"quantize": quantized, "keep": kept},
        "tensor_types": plan.type_counts(),
        # the vision/audio projector llama.cpp's tools load with --mmproj (convert_hf_to_gguf.py --mmproj), or None
        "mmproj": {"name": plan.mmproj.files[0].name, "architecture": plan.mmproj.model.arch, "quant_type": plan.mmproj.quant_type,
                   "tensor_types": plan.mmproj.type_counts()} if plan.mmproj else None,
        "input_bytes": plan.input_bytes,
        "expected_output_bytes": out_total,
        "compression_ratio": plan.input_bytes / out_total if out_total else 0.0,
        "largest_tensor_bytes": plan.largest_tensor(),
        "disk_needed_bytes": window + output,
        "disk_least_bytes": (plan.largest_tensor() if downloads else 0) + output,  # as plan_summary's
        "files": {name: {"action": d.action, "reason": d.reason} for name, d in plan.files.items()},
        "left_out_files": plan.left_out,
        "warnings": list(plan.warnings),
        "note": ("Q4_0 groups on a QAT grid (w = bf16(s * q), q in [-8, 7]) keep their own scale and integers where "
                 "llama.cpp's Q4_0 would move them; the run counts them (summary, model card)")
        if plan.settings.quant_type == "q4_0" else None,
    }


def format_gguf_plan(summary: dict[str, Any]) -> str:
    lines = [
        f"source: {summary['source']}" + (f" @ {summary['revision']}" if summary["revision"] else ""),
        f"GGUF {summary['settings']['quant_type'].upper()} ({summary['architecture']}): "
        + ", ".join(f"{n} {t}" for t, n in summary["tensor_types"].items()),
        "",
        *(f"{o['name']:<60} {human_size(o['expected_bytes']):>10} {o['tensors']:>5} tensors" for o in summary["outputs"]),
        *([f"--mmproj projector {summary['mmproj']['name']} ({summary['mmproj']['quant_type'].upper()}): "
           + ", ".join(f"{n} {t}" for t, n in summary["mmproj"]["tensor_types"].items())] if summary.get("mmproj") else []),
        "",
        f"{human_size(summary['input_bytes'])} -> {human_size(summary['expected_output_bytes'])}; "
        f"disk needed {human_size(summary['disk_needed_bytes'])}",
        *(f"left out: {name}: {reason}" for name, reason in summary["left_out_files"].items()),
        *(f"warning: {w}" for w in summary["warnings"]),
        *([f"note: {summary['note']}"] if summary.get("note") else []),
    ]
    return "\n".join(lines)


def _disk_counted(downloads: bool, budget: int, carried: int) -> str:
    """What the disk figure counts, in words: a local source is read in place, so no input is counted."""
    if not downloads:
        return "two output shards; a local source is read in place"
    if carried > budget:
        return "the files carried over unchanged, fetched for the final commit"
    return "the default disk_budget: two output shards, the largest tensor and 1 GB of read-ahead"


def format_plan(summary: dict[str, Any], *, verbose: bool = False, rules: dict | None = None) -> str:
    lines = [
        f"source: {summary['source']}" + (f" @ {summary['revision']}" if summary["revision"] else ""),
        f"model dtype: {summary['model_dtype']}   settings: {summary['settings']}",
        *([f"source quantized ({summary['source_quantization']}): {summary['dequantized_tensors']} tensors dequantized as they arrive"]
          if summary.get("source_quantization") else []),
        "",
        f"{'source file':<44} {'size':>10} {'quant':>6} {'keep':>5} {'drop':>5}",
    ]
    for s in summary["shards"]:
        lines.append(f"{s['name']:<44} {human_size(s['input_bytes']):>10} {s['quantize']:>6} {s['keep']:>5} {s['drop']:>5}")
    outputs = summary["outputs"]
    largest = max((o["expected_bytes"] for o in outputs), default=0)
    lines += [
        "",
        f"output: {len(outputs)} shard(s) of at most {human_size(summary['settings']['max_shard_size'])} "
        f"(largest {human_size(largest)}), cut from the stream of tensors, whatever the source's shard sizes",
    ]
    lines += ["", "tensors:"]
    lines += [f"  {count:>6}  {reason}" for reason, count in summary["reasons"].items()]
    if verbose and rules:
        lines += ["", "per tensor:"] + [f"  {r.action:<8} {k}  ({r.reason})" for k, r in rules.items()]
    lines += [
        "",
        f"size: {human_size(summary['input_bytes'])} -> {human_size(summary['expected_output_bytes'])} "
        f"({summary['compression_ratio']:.2f}x smaller)",
        f"disk needed in work_dir: {human_size(summary['disk_needed_bytes'])} ({summary['disk_counted']}); "
        f"at least {human_size(summary['disk_least_bytes'])} with a smaller disk_budget",
        "",
        "files:",
    ]
    lines += [f"  {f['action']:<9} {name}  ({f['reason']})" for name, f in summary["files"].items()]
    lines += [f"note: {summary['note']}"] if summary.get("note") else []
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def format_status(manifest: Manifest, total_shards: int | None = None) -> str:
    done = list(manifest.shards.values())
    total = f"/{total_shards}" if total_shards else ""
    pending = f", {len(manifest.pending)} waiting for a source file's sha256 check" if manifest.pending else ""
    lines = [
        f"status: {manifest.status}  ({len(done)}{total} shards published{pending})",
        f"source: {manifest.source}" + (f" @ {manifest.source_revision}" if manifest.source_revision else ""),
        f"settings: {_settings_shown(manifest.settings)}   device: {manifest.device}   streamq {manifest.streamq_version}",
        f"started: {manifest.created_at}   last update: {manifest.updated_at}",
    ]
    for entry in sorted(done, key=lambda e: e.output_name):
        lines.append(f"  done  {entry.output_name}  {human_size(entry.output_size)}  from {', '.join(entry.inputs)}  {entry.finished_at}")
    totals = stats_total(done)
    if totals.get("groups"):
        lines.append(f"grid-exact groups: {totals['groups_exact']} of {totals['groups']} "
                     f"({totals['weights_exact']} of {totals['weights']} weights entirely)")
    return "\n".join(lines)


def _settings_shown(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that mean something for the output's format (bitsandbytes' own only for NF4/FP4)."""
    if settings.get("quant_type") in BNB_TYPES:
        return settings
    return {k: v for k, v in settings.items() if k not in ("double_quant", "compute_dtype")}


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
