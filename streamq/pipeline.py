"""The run: plan -> (download -> window -> convert -> write -> publish -> record) as a stream -> finish.

`iter_requantize` is the pipeline as an iterator, yielding one record per output shard as it is
published; `stream_requantize` drives it and returns the summary.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils import disable_progress_bars
from tqdm.auto import tqdm

from . import __version__
from .budget import DiskBudget, pools
from .cluster import check_cluster, cluster_scheduler, job_context
from .commits import DEFAULT_COMMITS_PER_HOUR
from .converters import converter_for
from .errors import InsufficientDiskError, OutputNotWritableError, StreamqError
from .fetch import HubSource, Source, open_source
from .gguf import GgufPlan, build_gguf_plan, check_available, gguf_stream, render_gguf_card
from .layout import OutputShard
from .finish import output_config, output_index
from .hub import make_api, require_online
from .journal import JOURNAL_NAME
from .location import HubRepo, LocalDir, parse_location, source_location
from .manifest import Manifest, stats_total
from .modelcard import render_model_card
from .plan import INDEX_NAME, Plan, build_plan
from .publish import HubSink, LocalSink, Payload, Sink
from .record import ShardRecord
from .schedule import Scheduler
from .settings import DEFAULT_MAX_SHARD_SIZE, QuantSettings
from .surface import remedy
from .workdir import WorkDir, default_root, folder_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequantizeResult:
    source: str
    source_revision: str | None
    output: str
    shards: int
    shards_skipped: int
    bytes_in: int
    bytes_converted: int  # of the source's tensors, by this run (a resumed run skips what is done)
    bytes_out: int
    tensors_quantized: int
    tensors_kept: int
    device: str
    elapsed: float
    stats: dict[str, int] = field(default_factory=dict)  # the converter's totals over all shards, e.g. grid-exact groups

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0


def stream_requantize(src: str | Path, dst: str | Path, **options) -> RequantizeResult:
    """Re-quantize `src` into `dst` tensor by tensor; run it again to resume. Options: see `iter_requantize`."""
    run = iter_requantize(src, dst, **options)
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def iter_requantize(
    src: str | Path,
    dst: str | Path,
    *,
    revision: str | None = None,
    format: str = "safetensors",
    quant_type: str | None = None,
    double_quant: bool = True,
    blocksize: int | None = None,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
    work_dir: str | Path | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    device: str = "auto",
    trust_remote_code: bool = False,
    commits_per_hour: int = DEFAULT_COMMITS_PER_HOUR,
    branch: str | None = None,
    disk_budget: int | Callable[[Plan], int | None] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    create_pr: bool = False,
    cluster: str | None = None,
    tqdm_class: type[tqdm] = tqdm,
) -> Generator[ShardRecord, None, RequantizeResult]:
    """Yield a `ShardRecord` per shard as it is published; the generator returns the `RequantizeResult`.

    `src`/`dst`: a `Path` or a string starting with `/`, `.` or `~` is a local directory, any other string
    a Hub repo id (`src` may be `id@revision`). A folder for this output under `work_dir` (default:
    STREAMQ_WORK_DIR or the temp dir, see `workdir.py`) holds the read-ahead window of the source's
    bytes and the output shards being written and uploaded; a resumed run that finds it commits the
    shards a killed run uploaded without committing. A finished run removes the folder.
    `max_shard_size` (bytes or transformers' spelling, "1GB") cuts the output into shards of at most
    that size, however the source is sharded. `commits_per_hour` caps Hub commits in any rolling hour, counting
    the output's own recent ones (the Hub limits them): each shard is committed when uploaded while the
    budget allows, else shards are committed in even batches. `overwrite` discards an
    existing output made with other settings or from another revision. `branch` publishes to that
    branch of the output repo (created from main if missing) instead of main. `create_pr` stages the
    output on `branch` (default "streamq-4bit") and then opens it as a pull request. `disk_budget` (bytes)
    is the most work_dir holds: two output shards plus the window, which must hold the largest tensor;
    what is left of it lets the download run ahead (default: 1 GB of read-ahead). It may be a function
    of the run's plan (bytes, or None for the default), for a caller that sizes it from the model
    without planning it a second time.
    `cluster` ("auto", "ray://host:10001" or a Ray address) runs the conversion on that Ray cluster
    (`pip install "streamq[ray]"` there and here): jobs of consecutive output shards, each downloading,
    converting and uploading its own bytes on a worker node within `disk_budget`, while this process
    records and commits them. Source and output must both be Hub repos.
    `tqdm_class` makes the run's one progress bar (as in huggingface_hub's `snapshot_download`): its
    `desc` and `postfix` name the phase, `n` of `total` the input bytes published; a subclass can
    show them elsewhere, as the web app (`streamq.app`) does.
    """
    started = time.monotonic()
    settings = _settings(format, quant_type, double_quant, blocksize, compute_dtype, skip_modules, max_shard_size)
    _check_available(settings)  # a missing extra (int4's compressed-tensors, GGUF's llama.cpp) is said before anything is planned or created
    src_loc = source_location(src, revision)
    dst_loc = parse_location(dst, allow_revision=False)
    if create_pr and not isinstance(dst_loc, HubRepo):
        raise ValueError("create_pr needs a Hub repo as output, not a directory")
    if _same_location(src_loc, dst_loc):
        raise StreamqError(f"the output {dst} is the source itself; choose another output repo or directory")
    if cluster is not None:
        check_cluster(src_loc, dst_loc, settings)
    if isinstance(dst_loc, HubRepo):
        require_online(dst_loc.repo_id)
    if cluster is not None:
        device = "cuda" if device == "cuda" else "cpu"  # the nodes' devices, not this machine's
    else:
        device = _resolve_device(device) if settings.format == "safetensors" else "cpu"  # llama.cpp's quantizers run on the CPU

    api = make_api(token, endpoint)
    finished = False
    with ExitStack() as stack:
        root = Path(work_dir).expanduser() if work_dir is not None else default_root()
        workdir = WorkDir.open(folder_for(root, dst_loc, api.endpoint, branch))
        stack.callback(lambda: workdir.close(finished=finished))
        work = workdir.path
        stack.enter_context(disable_progress_bars())  # one streamq bar instead of one per file transfer
        source = open_source(src_loc, api)
        downloads = isinstance(source, HubSource)
        plan = _build_plan(source, settings, work / "meta", trust_remote_code)
        for warning in plan.warnings:
            logger.warning(warning)
        chosen = disk_budget(plan) if callable(disk_budget) else disk_budget
        budget = _disk_budget(work, plan, downloads, chosen, cluster is not None)  # refused here, before a byte is written
        sink: Sink = (
            HubSink(
                api, dst_loc.repo_id, private=private, commits_per_hour=commits_per_hour, branch=branch, create_pr=create_pr,
                journal=work / JOURNAL_NAME,
            )
            if isinstance(dst_loc, HubRepo)
            else LocalSink(dst_loc.path)
        )
        stack.callback(sink.close)
        manifest = _open_manifest(sink, plan, settings, device, work, overwrite)
        todo = [i for i, o in enumerate(plan.outputs) if not _done(manifest, o, plan)]

        bar = stack.enter_context(tqdm_class(total=plan.input_bytes, unit="B", unit_scale=True, disable=not progress, desc="streamq"))
        if cluster is not None:
            assert isinstance(sink, HubSink) and isinstance(dst_loc, HubRepo) and isinstance(source, HubSource)
            context = job_context(api, source.repo_id, source.revision, dst_loc.repo_id, sink.branch, device, chosen)
            scheduler = cluster_scheduler(cluster, plan, manifest, sink, context, bar)
        else:
            gguf = isinstance(plan, GgufPlan)
            stream = {"stream": gguf_stream, "warm": lambda plan, device: None} if gguf else {}
            scheduler = Scheduler(source, sink, plan, manifest, work, device, budget, bar, **stream)
        stack.callback(scheduler.close)
        for index, output in enumerate(plan.outputs):
            if index not in todo:
                entry = manifest.shards.get(output.name) or manifest.pending[output.name]
                bar.update(scheduler.input_bytes(index))
                yield ShardRecord(index + 1, len(plan.outputs), output.name, scheduler.input_bytes(index), entry.output_size, True, True, 0.0)
        yield from scheduler.run(todo)
        if cluster is None:
            logger.info("peak work_dir use %d bytes of a %d byte budget", budget.peak, budget.limit)
        if manifest.pending:
            raise StreamqError(f"{len(manifest.pending)} output shard(s) still wait for their source files' sha256 check; run again to finish")

        bar.update(plan.input_bytes - bar.n)
        bar.set_description("finishing")
        if manifest.status != "done":
            manifest.status = "done"
            sink.finalize(_final_files(source, plan, manifest, work, dst_loc, trust_remote_code), manifest)
        bar.set_description("done")
        finished = True

    entries = manifest.shards.values()
    quantized, kept = _tensor_counts(plan)
    return RequantizeResult(
        source=plan.source,
        source_revision=plan.revision,
        output=sink.location,
        shards=len(plan.outputs),
        shards_skipped=len(plan.outputs) - len(todo),
        bytes_in=plan.input_bytes,
        bytes_converted=sum(scheduler.input_bytes(i) for i in todo),
        bytes_out=sum(e.output_size for e in entries),
        tensors_quantized=quantized,
        tensors_kept=kept,
        device=device,
        elapsed=time.monotonic() - started,
        stats=dict(stats_total(manifest.shards.values())),
    )


def plan_requantize(
    src: str | Path,
    *,
    revision: str | None = None,
    format: str = "safetensors",
    quant_type: str | None = None,
    double_quant: bool = True,
    blocksize: int | None = None,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    trust_remote_code: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Plan | GgufPlan:
    """What a run would do, from config, index and safetensors headers (weights are read only for a
    checkpoint that stores both ends of a tied weight, to see whether they are equal, as transformers does)."""
    settings = _settings(format, quant_type, double_quant, blocksize, compute_dtype, skip_modules, max_shard_size)
    _check_available(settings)
    source = open_source(source_location(src, revision), make_api(token, endpoint))
    with tempfile.TemporaryDirectory(prefix="streamq-plan-") as tmp:
        return _build_plan(source, settings, Path(tmp), trust_remote_code)


def _check_available(settings: QuantSettings) -> None:
    if settings.format == "gguf":
        check_available(settings)
    else:
        converter_for(settings)


def _build_plan(source: Source, settings: QuantSettings, meta: Path, trust_remote_code: bool) -> Plan | GgufPlan:
    if settings.format == "gguf":
        return build_gguf_plan(source, settings, meta)
    return build_plan(source, settings, meta, trust_remote_code=trust_remote_code)


def _tensor_counts(plan: Plan | GgufPlan) -> tuple[int, int]:
    if isinstance(plan, GgufPlan):
        return plan.tensor_counts()
    rules = plan.rules.values()
    return sum(1 for r in rules if r.action == "quantize"), sum(1 for r in rules if r.action == "keep")


def _settings(
    format: str, quant_type: str | None, double_quant: bool, blocksize: int | None, compute_dtype: str, skip_modules: Sequence[str] | None, max_shard_size: int | str,
) -> QuantSettings:
    skip = tuple(skip_modules) if skip_modules is not None else None
    return QuantSettings(quant_type, double_quant, blocksize, compute_dtype, skip, max_shard_size, format)


def _same_location(a: HubRepo | LocalDir, b: HubRepo | LocalDir) -> bool:
    if isinstance(a, HubRepo) and isinstance(b, HubRepo):
        return a.repo_id == b.repo_id
    if isinstance(a, LocalDir) and isinstance(b, LocalDir):
        return a.path.resolve() == b.path.resolve()
    return False


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StreamqError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    return device


def _open_manifest(sink: Sink, plan: Plan, settings: QuantSettings, device: str, work: Path, overwrite: bool) -> Manifest:
    """Resume the manifest already in the output, after checking it describes the same job."""
    fresh = Manifest(plan.source, plan.revision, settings.as_dict(), device, __version__)
    existing = sink.read_manifest(work / "meta-out")
    if existing is not None and not overwrite:
        existing.check_compatible(fresh)
        return existing
    leftovers = sink.existing_files()
    if leftovers and not overwrite:
        raise OutputNotWritableError(
            f"{sink.location} already holds files ({', '.join(leftovers[:3])}) that streamq did not write; "
            f"choose an empty output, or {remedy('overwrite')} to replace them"
        )
    if leftovers:
        sink.clear()
    return fresh


def _disk_budget(work: Path, plan: Plan, downloads: bool, disk_budget: int | None, cluster: bool = False) -> DiskBudget:
    """The budget, once the disk is known to hold it (and the files carried over, fetched at the end).
    A cluster run's jobs check their nodes' disks; the driver only fetches the carried files."""
    window, output = (0, 0) if cluster else pools(plan.largest_tensor(), plan.output_pair(), downloads, disk_budget)
    carried = plan.carried_bytes if downloads else 0
    need = max(window + output, carried)
    free = shutil.disk_usage(work).free
    if need > free:
        what = "the files carried over unchanged" if carried > window + output else "the disk budget"
        raise InsufficientDiskError(
            f"work_dir {work} needs {_gb(need)} ({what}) but has {_gb(free)} free; "
            f"free some space, or {remedy('less_disk')}"
        )
    return DiskBudget(window, output)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _done(manifest: Manifest, output: OutputShard, plan: Plan) -> bool:
    """An output shard counts as made only if it came from these exact source files."""
    entry = manifest.shards.get(output.name) or manifest.pending.get(output.name)
    if entry is None:
        return False
    sha = {s.name: s.sha256 for s in plan.shards}
    return set(entry.inputs) == set(output.files) and all(entry.inputs[f] == sha[f] for f in output.files)


def _final_files(source: Source, plan: Plan | GgufPlan, manifest: Manifest, work: Path, dst: HubRepo | LocalDir, trust_remote_code: bool) -> dict[str, Payload]:
    """Carried-over files first, then the model card, config.json and the index last (a GGUF repo: the card alone)."""
    if isinstance(plan, GgufPlan):
        return {"README.md": _gguf_card(source, plan, manifest, work, dst)}
    files: dict[str, Payload] = {name: source.fetch(name, work / "extra").path for name in plan.extra_files}
    source_card = None
    if "README.md" in plan.files:
        source_card = source.fetch("README.md", work / "card").path.read_text(encoding="utf-8", errors="replace")
    output_bytes = sum(e.output_size for e in manifest.shards.values())
    repo_name = dst.repo_id if isinstance(dst, HubRepo) else str(dst.path)
    files["README.md"] = render_model_card(plan, repo_name, source_card, output_bytes, stats_total(manifest.shards.values())).encode()
    files["config.json"] = output_config(plan, work / "meta", trust_remote_code)
    if len(plan.outputs) > 1:  # one output file is model.safetensors, with no index (as transformers saves it)
        files[INDEX_NAME] = output_index(plan, manifest)
    return files


def _gguf_card(source: Source, plan: GgufPlan, manifest: Manifest, work: Path, dst: HubRepo | LocalDir) -> bytes:
    source_card = source.fetch("README.md", work / "card").path.read_text(encoding="utf-8", errors="replace") if "README.md" in plan.files else None
    repo_name = dst.repo_id if isinstance(dst, HubRepo) else str(dst.path)
    output_bytes = sum(e.output_size for e in manifest.shards.values())
    return render_gguf_card(plan, repo_name, source_card, output_bytes, stats_total(manifest.shards.values())).encode()
