"""Check a finished output against its manifest: files, checksums, index, config; optionally load it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .converters import converter_for
from .errors import CorruptShardError, SourceNotFoundError, StreamqError
from .fetch import Source, file_sha256, open_source
from .hub import make_api
from .location import LocalDir, source_location
from .manifest import MANIFEST_NAME, Manifest
from .plan import INDEX_NAME
from .settings import QuantSettings


@dataclass
class VerifyReport:
    location: str
    manifest: Manifest | None
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0
    loaded: bool | None = None  # None when --load was not asked for

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(
    dst: str | Path, *, load: bool = False, branch: str | None = None, token: str | bool | None = None, endpoint: str | None = None
) -> VerifyReport:
    """Check a streamq output (Hub repo or directory) against its manifest; `load` also runs it once."""
    return verify_source(_open_output(dst, branch, token, endpoint), load=load)


def read_status(dst: str | Path, *, branch: str | None = None, token: str | bool | None = None, endpoint: str | None = None) -> Manifest:
    """The manifest of an output: what is done, from which source revision, with which settings."""
    return read_manifest(_open_output(dst, branch, token, endpoint))


def _open_output(dst: str | Path, branch: str | None, token: str | bool | None, endpoint: str | None) -> Source:
    location = source_location(dst, branch)
    if isinstance(location, LocalDir) and not location.path.is_dir():
        raise SourceNotFoundError(f"output directory {location.path} does not exist; name the directory a run wrote")
    return open_source(location, make_api(token, endpoint))


def read_manifest(output: Source) -> Manifest:
    if MANIFEST_NAME not in output.files():
        raise StreamqError(f"{output.name} has no {MANIFEST_NAME}: it was not written by streamq (or not yet)")
    return Manifest.from_json(output.read_text(MANIFEST_NAME))


def verify_source(output: Source, *, load: bool = False) -> VerifyReport:
    manifest = read_manifest(output)
    report = VerifyReport(output.name, manifest)
    problems = report.problems
    files = output.files()
    if manifest.status != "done":
        problems.append(f"the run is not finished (status {manifest.status!r}); run streamq requantize again to finish it")

    for entry in manifest.shards.values():
        info = files.get(entry.output_name)
        if info is None:
            problems.append(f"{entry.output_name}: listed in the manifest but missing")
            continue
        report.checked_files += 1
        if info.size != entry.output_size:
            problems.append(f"{entry.output_name}: {info.size} bytes, the manifest says {entry.output_size}")
        digest = info.sha256 or file_sha256(output.fetch(entry.output_name, Path(tempfile.gettempdir())).path)
        if digest != entry.output_sha256:
            problems.append(f"{entry.output_name}: sha256 {digest} differs from the manifest's {entry.output_sha256}")

    gguf = manifest.settings.get("format") == "gguf"  # llama.cpp's files: no config.json or index
    if manifest.status == "done" and not gguf:
        _check_config(output, manifest, problems)
        _check_index(output, manifest, problems)
    if load and not problems:
        report.loaded = (_load_and_run_gguf if gguf else _load_and_run)(output, problems)
    return report


def _check_config(output: Source, manifest: Manifest, problems: list[str]) -> None:
    config = json.loads(output.read_text("config.json")) if "config.json" in output.files() else None
    if config is None:
        problems.append("config.json is missing")
        return
    settings = QuantSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest.settings.items()})
    problems.extend(converter_for(settings).check_config(config.get("quantization_config"), manifest.settings))


def _check_index(output: Source, manifest: Manifest, problems: list[str]) -> None:
    shard_keys = {e.output_name: set(e.keys) for e in manifest.shards.values()}
    if INDEX_NAME not in output.files():
        if len(shard_keys) != 1:
            problems.append(f"{INDEX_NAME} is missing for a model of {len(shard_keys)} shards")
        return
    index = json.loads(output.read_text(INDEX_NAME))
    weight_map: dict[str, str] = index.get("weight_map", {})
    try:
        headers = output.headers(sorted(shard_keys))
    except CorruptShardError as exc:
        problems.append(str(exc))
        return
    for name, keys in shard_keys.items():
        if set(headers[name].tensors) != keys:
            problems.append(f"{name}: its tensors differ from the manifest's list")
        wrong = sorted(k for k in headers[name].tensors if weight_map.get(k) != name)
        if wrong:
            problems.append(f"{INDEX_NAME} does not map {wrong[0]} (and {len(wrong) - 1} more) to {name}")
    extra = set(weight_map) - set().union(*shard_keys.values())
    if extra:
        problems.append(f"{INDEX_NAME} names {len(extra)} tensor(s) no shard holds, e.g. {sorted(extra)[0]}")
    total = sum(e.tensor_bytes for e in manifest.shards.values())
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(f"{INDEX_NAME} total_size is {index.get('metadata', {}).get('total_size')}, the shards hold {total}")


def _load_and_run(output: Source, problems: list[str]) -> bool:
    """Load with transformers on CPU and run one forward pass: the user's first step, done for them."""
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="streamq-verify-") as tmp:
        try:
            model = AutoModelForCausalLM.from_pretrained(_gather(output, output.files(), Path(tmp)), device_map="cpu")
            with torch.no_grad():
                logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        except Exception as exc:  # any failure here is the finding we report
            problems.append(f"transformers could not load and run it: {type(exc).__name__}: {exc}")
            return False
    if not torch.isfinite(logits).all():
        problems.append("the forward pass produced non-finite logits")
        return False
    return True


def _gather(output: Source, names: Iterable[str], tmp: Path) -> Path:
    """The output's files `names` in one local folder (linked where they are local already), as a user has them."""
    for name in names:
        fetched = output.fetch(name, tmp / "dl")
        dest = tmp / "model" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if fetched.temporary:
            fetched.path.replace(dest)
        else:
            dest.symlink_to(fetched.path)
    return tmp / "model"


def _load_and_run_gguf(output: Source, problems: list[str]) -> bool:
    """Load with llama.cpp (llama-cpp-python), from the first file as a user would, and evaluate four tokens."""
    import numpy as np
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory(prefix="streamq-verify-") as tmp:
        names = sorted(n for n in output.files() if n.endswith(".gguf"))
        # the model's first file (llama.cpp's gguf_filename_is_model: a --mmproj projector is not a model)
        names.sort(key=lambda n: "mmproj" in PurePosixPath(n).name)
        folder = _gather(output, names, Path(tmp))
        try:
            llm = Llama(model_path=str(folder / names[0]), n_ctx=32, logits_all=True, verbose=False)
            llm.eval([1, 2, 3, 4])
            logits = np.asarray(llm.scores[: llm.n_tokens])
            llm.close()
        except Exception as exc:  # any failure here is the finding we report
            problems.append(f"llama.cpp could not load and run it: {type(exc).__name__}: {exc}")
            return False
    if not np.isfinite(logits).all():
        problems.append("the forward pass produced non-finite logits")
        return False
    return True
