"""compressed-tensors `pack-quantized` int4 (W4A16): what llm-compressor writes, QAT grids kept exact.

Which layers: llm-compressor's W4A16 rule, every module compressed-tensors matches as "Linear" on the
model (built on the meta device) outside `ignore` (default `["lm_head"]`); per-expert MoE weights
that transformers fuses on load are quantized under their checkpoint names, as `model_free_ptq`
writes them (transformers loads those back). Scales: llm-compressor's round-to-nearest (static
min-max observer, compressed-tensors' `calculate_qparams`), except for a group whose weights lie
on a symmetric 4-bit grid (w = s * q in the weight's dtype, q in [-8, 7], as a QAT checkpoint
stores them) that round-to-nearest would move: there the grid's own s is written, so the
dequantized weight is the source bit for bit. Packing is compressed-tensors' own compressor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StreamqError, UnsupportedModelError
from ..settings import QuantSettings
from .base import HEADER_BYTES_PER_TENSOR, CardText, Stats

_CHUNK_GROUPS = 1 << 15  # groups searched at once (16 candidate scales each; 2 MiB float32 temporaries)
# The largest |q| in a group (8 first: a Q4_0 group of 32 holds a -8 most often, then 7, ...).
_POWERS = torch.tensor([8.0, 4.0, 2.0, 1.0])
_OTHERS = torch.tensor([7.0, 6.0, 5.0, 3.0])


class Int4Targets:
    """The planning state of one meta model: the parameters llm-compressor's rule quantizes."""

    def __init__(self) -> None:
        self.weights: set[str] = set()  # "<Linear module>.weight"
        self.ignored: set[str] = set()  # modules matched by `ignore`

    def update_weight_conversions(self, conversions: list[Any], model: Any) -> list[Any]:
        """As transformers' quantizers are asked when it builds the conversion mapping: a
        not-yet-quantized model loads with the plain mapping."""
        return conversions


class Int4Converter:
    """W4A16, symmetric, group strategy, written with compressed-tensors' classes."""

    name = "compressed-tensors"
    quantize_reason = "Linear layer, quantized by llm-compressor's W4A16 rule"

    def __init__(self, settings: QuantSettings) -> None:
        try:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        except ImportError as exc:
            raise StreamqError("quant_type int4 writes with the compressed-tensors package: pip install 'streamq[int4]'") from exc

        self.settings = settings
        self.group_size = int(settings.blocksize or 128)
        self.ignore = list(settings.skip_modules) if settings.skip_modules is not None else ["lm_head"]
        self.scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=self.group_size),
        )

    # planning
    def make_quantizer(self) -> Int4Targets:
        return Int4Targets()

    def prepare_meta_model(self, model: Any, quantizer: Int4Targets, dtype: torch.dtype) -> None:
        """compressed-tensors' own matcher (class "Linear", `ignore` by name or "re:" regex)."""
        from compressed_tensors.utils import match_named_modules

        for name, module in match_named_modules(model, self.scheme.targets, self.ignore):
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            if weight.shape[1] % self.group_size:
                raise UnsupportedModelError(
                    f"{name} has {weight.shape[1]} input features, not a multiple of the int4 group size "
                    f"{self.group_size}; choose blocksize {self._sizes_dividing(weight.shape[1])} or keep it with skip_modules"
                )
            quantizer.weights.add(f"{name}.weight")
        quantizer.ignored = {name for name, _ in model.named_modules() if _matches(name, self.ignore)}

    def _sizes_dividing(self, features: int) -> str:
        from ..settings import INT4_GROUP_SIZES

        sizes = [str(g) for g in INT4_GROUP_SIZES if features % g == 0]
        return " or ".join(sizes) if sizes else "(none fits)"

    def needs_quantization(self, model: Any, quantizer: Int4Targets, param_name: str) -> bool:
        return param_name in quantizer.weights

    def quantizes_fused_source(self, model: Any, quantizer: Int4Targets, param_name: str, shape: tuple[int, ...]) -> bool:
        """Per-expert 2-D checkpoint weights that transformers fuses into a 3-D experts parameter are
        quantized one by one, as model_free_ptq does (transformers' load splits them back)."""
        module = param_name.rsplit(".", 1)[0]
        if len(shape) != 2 or module in quantizer.ignored:
            return False
        try:
            param = model.get_parameter(param_name)
        except AttributeError:
            return False
        if param.dim() != 3:
            return False
        if shape[1] % self.group_size:
            raise UnsupportedModelError(
                f"the experts of {module} have {shape[1]} input features, not a multiple of the int4 group size "
                f"{self.group_size}; choose blocksize {self._sizes_dividing(shape[1])}"
            )
        return True

    # quantizing
    def quantize_weight(self, weight: torch.Tensor, device: str, stats: Stats | None = None) -> dict[str, torch.Tensor]:
        """`weight_packed`, `weight_scale`, `weight_shape` from compressed-tensors' PackedQuantizationCompressor."""
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        w = weight.to(device)
        scale, exact = self.scales(w)
        out = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, self.scheme)
        if stats is not None:
            groups = exact.numel()
            stats["weights"] += 1
            stats["groups"] += groups
            stats["groups_exact"] += int(exact.sum())
            stats["weights_exact"] += int(bool(exact.all()))
            stats["params"] += w.numel()
        return {k.removeprefix("weight"): v.cpu().contiguous() for k, v in out.items()}  # "_packed", "_scale", "_shape"

    def scales(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group scales [out, in/group] in w's dtype, and which groups dequantize to w bit for bit.

        Round-to-nearest (llm-compressor's observer: min/max per group in w's dtype, then
        compressed-tensors' `calculate_qparams`) except where a grid scale reproduces the group and
        round-to-nearest does not (it reproduces only all-zero groups). Grid scales are searched for
        all groups at once (see `_grid_scales`)."""
        from compressed_tensors.quantization.utils import calculate_qparams

        out_features, in_features = w.shape
        groups = w.reshape(-1, self.group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale, _ = calculate_qparams(low, high, self.scheme.weights)
        exact = torch.zeros_like(scale, dtype=torch.bool)
        absmax = torch.maximum(-low, high)  # max |w| per group, from the observer's min/max
        for start in range(0, groups.shape[0], _CHUNK_GROUPS):
            # Round-to-nearest never reproduces a group with a nonzero weight (its largest weight comes
            # back as 7 or 8 times max/7.5, 6-7% off), so a grid scale found replaces it.
            part = slice(start, start + _CHUNK_GROUPS)
            found, grid = _grid_scales(groups[part], absmax[part])
            scale[part][found] = grid[found]
            exact[part] = found
        zero = (~exact & (low == 0) & (high == 0)).nonzero().squeeze(1)  # no grid scale; round-to-nearest keeps +0.0
        exact[zero] = _reproduces(groups[zero], scale[zero, None])
        shape = (out_features, in_features // self.group_size)
        return scale.reshape(shape), exact.reshape(shape)

    def warm_up_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ones(16, 4 * self.group_size, dtype=dtype)

    def expected_size(self, shape: tuple[int, ...]) -> int:
        out_features, in_features = shape[0], shape[-1]
        scale_itemsize = 4  # the model dtype's, at most float32
        return (
            out_features * -(-in_features // 8) * 4
            + out_features * -(-in_features // self.group_size) * scale_itemsize
            + 16 + 3 * HEADER_BYTES_PER_TENSOR
        )

    # config.json, verify, card
    def config_block(self) -> dict[str, Any]:
        """`quantization_config` as llm-compressor's model_free_ptq writes it (compressed status)."""
        from compressed_tensors import __version__ as ct_version
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        config = QuantizationConfig(
            config_groups={"config_group_0": self.scheme.model_copy(update={"format": "pack-quantized"})},
            ignore=list(self.ignore),
            quantization_status=QuantizationStatus.COMPRESSED,
            format="pack-quantized",
        )
        return {"version": ct_version, "quant_method": "compressed-tensors", "transform_config": {}, **config.model_dump()}

    def check_config(self, quantization_config: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
        quant = quantization_config or {}
        problems = [
            f"config.json quantization_config[{key!r}] is {quant.get(key)!r}, expected {value!r}"
            for key, value in (("quant_method", "compressed-tensors"), ("format", "pack-quantized"), ("quantization_status", "compressed"))
            if quant.get(key) != value
        ]
        weights = [g.get("weights") or {} for g in (quant.get("config_groups") or {}).values()]
        if not weights or any(w.get("num_bits") != 4 or w.get("group_size") != settings["blocksize"] for w in weights):
            problems.append(f"config.json quantization_config does not describe int4 weights in groups of {settings['blocksize']}")
        return problems

    def plan_note(self) -> str | None:
        note = ("grid-exact groups (weights already on a 4-bit grid, as in QAT checkpoints) are counted while "
                "quantizing; the run's summary, manifest and model card report them")
        return note if self.group_size == 32 else note + ". QAT checkpoints trained on groups of 32 need blocksize 32"

    def card(self, stats: Stats) -> CardText:
        groups, exact = stats.get("groups", 0), stats.get("groups_exact", 0)
        share = exact / groups if groups else 0.0
        if groups and share == 1.0:
            verdict = "**yes**: every group of every quantized weight lies on a 4-bit grid and was kept exactly"
        elif share >= 0.5:
            verdict = f"mostly: {share:.1%} of the groups lie on a 4-bit grid and were kept exactly; the rest were rounded to nearest"
        else:
            verdict = f"no ({share:.2%} of the groups were on a 4-bit grid); the weights were rounded to nearest as llm-compressor does"
        return CardText(
            title=f"int4 W4A16 (compressed-tensors, group size {self.group_size})",
            tags=["compressed-tensors", "int4", "w4a16", "4-bit"],
            description=(
                "The weights are compressed-tensors `pack-quantized` int4 (W4A16: symmetric, one scale per group of "
                f"{self.group_size} input weights, activations unquantized), the format llm-compressor's `W4A16` scheme writes; "
                "transformers loads it with the `compressed-tensors` package and vLLM serves it with its int4 kernels. "
                "Groups whose weights already lie on a symmetric 4-bit grid (quantization-aware-trained checkpoints) keep "
                "that grid's scale, so they dequantize to the source weights bit for bit; the others are rounded to nearest "
                "exactly as llm-compressor's `model_free_ptq` does.\n\n"
                f"Quantization-aware-trained (QAT) source: {verdict} "
                f"({exact} of {groups} groups; {stats.get('weights_exact', 0)} of {stats.get('weights', 0)} weights entirely)."
            ),
            rows=[
                ("format", "`compressed-tensors` pack-quantized, int4 W4A16, symmetric"),
                ("group size", f"`{self.group_size}`"),
                ("not quantized", ", ".join(f"`{m}`" for m in self.ignore) + " and every non-Linear layer (embeddings, norms, routers)"),
                ("grid-exact groups", f"{exact} / {groups}"),
            ],
            loading=(
                "Needs `compressed-tensors` installed. vLLM: `vllm serve <this repo>`. To get plain dequantized weights "
                "in transformers, pass `quantization_config=CompressedTensorsConfig(run_compressed=False)`."
            ),
        )


def _grid_scales(groups: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups [n, group] and their largest |w| [n]: whether a grid scale reproduces each, and that scale.

    Candidates: s = |w|max / m for m = 8..1 (the largest |q| of the group), and for m not a power of
    two also the dtype's neighbours of that quotient (|w|max itself was rounded). Every candidate
    is first tried on the first three weights of each group (which rejects ordinary weights
    cheaply; after the first weight only the surviving (group, candidate) pairs are tried further);
    a group's first surviving candidate is then checked exactly on the whole group, the next one
    where that fails."""
    n = groups.shape[0]
    absmax = absmax.float()[:, None]
    exact = (absmax / _POWERS.to(groups.device)).to(groups.dtype)  # |q|max a power of two: s = |w|max / |q|max exactly
    rounded = (absmax / _OTHERS.to(groups.device)).to(groups.dtype)  # else |w|max = dtype(s * |q|max): s is near it
    candidates = torch.cat((exact[:, :1], rounded[:, :1], _next(rounded[:, :1], 1), _next(rounded[:, :1], -1),
                            exact[:, 1:], rounded[:, 1:], _next(rounded[:, 1:], 1), _next(rounded[:, 1:], -1)), dim=-1)
    usable = (absmax > 0) & torch.isfinite(absmax)  # a zero or non-finite candidate never passes the exact check
    ok = _near_grid(groups, candidates, usable)
    found = torch.zeros(n, dtype=torch.bool, device=groups.device)
    best = torch.zeros(n, dtype=groups.dtype, device=groups.device)
    rows = ok.any(dim=-1).nonzero().squeeze(1)
    while rows.numel():
        first = ok[rows].to(torch.uint8).argmax(dim=-1)
        scale = candidates[rows, first]
        whole = _reproduces(groups if rows.numel() == n else groups[rows], scale[:, None])
        hit, miss = whole.nonzero().squeeze(1), (~whole).nonzero().squeeze(1)
        found[rows[hit]] = True
        best[rows[hit]] = scale[hit]
        failed = rows[miss]
        ok[failed, first[miss]] = False
        rows = failed[ok[failed].any(dim=-1)]
    return found, best


def _near_grid(groups: torch.Tensor, candidates: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """[n, candidates]: whether each candidate s passes a cheap necessary condition on the group's
    first three weights. w = dtype(s * q) is within u * |s q| of s q (u: the dtype's unit roundoff),
    so w / s is within u * |q| of the integer q; times 1/s in float32 adds far less than 2^-18.
    Ordinary bfloat16 weights pass it about 1 time in 32 per weight and candidate, so the first
    weight is tried on every pair and the next two only on the pairs still alive."""
    unit = torch.finfo(groups.dtype).eps / 2
    inverse = 1.0 / candidates.float()
    ratio = inverse * groups[:, :1].float()
    nearest = ratio.round()
    ratio.sub_(nearest).abs_()
    nearest.abs_().mul_(unit).add_(2**-18)
    near = (ratio <= nearest).logical_and_(usable)
    if groups.shape[1] > 1:
        count = candidates.shape[1]
        live = near.view(-1).nonzero().squeeze(1)  # flat (group, candidate) indices
        row = live // count
        inverse = inverse.view(-1)[live]
        for i in range(1, min(3, groups.shape[1])):
            ratio = inverse * groups[row, i].float()
            nearest = ratio.round()
            ratio.sub_(nearest).abs_()
            nearest.abs_().mul_(unit).add_(2**-18)
            keep = ratio <= nearest
            live, row, inverse = live[keep], row[keep], inverse[keep]
        near = torch.zeros_like(near).view(-1)
        near[live] = True
        near = near.view(candidates.shape)
    return near


def _reproduces(weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Whether quantizing `weights` with `scale` (broadcast over the last dim) and dequantizing gives
    back every weight's bits, all(-1). The same torch ops in the same dtype as compressed-tensors'
    quantize (x / scale, clamp to [-8, 7], round) and dequantize (q * scale), so the same results
    (tests/test_int4.py checks it against the library's own round trip); in place, one temporary."""
    q = (weights / scale).clamp_(-8, 7).round_().mul_(scale)
    return (_bits(q) == _bits(weights)).view(torch.uint8).amin(dim=-1).bool()  # all(-1), faster on CPU


def _matches(name: str, patterns: list[str]) -> bool:
    from compressed_tensors.utils.match import match_name

    return any(match_name(name, p) for p in patterns)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so -0.0 and 0.0 differ and NaN equals itself."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _next(t: torch.Tensor, direction: int) -> torch.Tensor:
    """The neighbouring representable value of each positive finite element in t's dtype (one step
    of its bit pattern; a result that leaves the positive finite range is filtered by the caller)."""
    return (_bits(t) + direction).view(t.dtype)
