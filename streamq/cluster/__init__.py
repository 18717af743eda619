"""A run on a Ray cluster (`cluster=`): the driver (this process) plans and commits, jobs on the
cluster's nodes move and convert the bytes. `jobs` cuts the work, `worker` runs a job on a node,
`board` carries what jobs did back to the driver, `driver` runs it all. Ray is imported only by a
cluster run (`pip install "streamq[ray]"`).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, get_token

from ..errors import StreamqError
from ..location import HubRepo, LocalDir
from ..settings import QuantSettings
from .jobs import JobContext

if TYPE_CHECKING:
    from .driver import ClusterScheduler


def check_cluster(src: HubRepo | LocalDir, dst: HubRepo | LocalDir, settings: QuantSettings) -> None:
    """Refuse, in one line, what a cluster run cannot do, before anything is planned."""
    if settings.format != "safetensors":
        raise StreamqError(f"a cluster run writes safetensors formats (NF4, FP4, int4, bf16); a {settings.format.upper()} conversion runs on one machine: drop cluster")
    if not (isinstance(src, HubRepo) and isinstance(dst, HubRepo)):
        raise StreamqError("a cluster run reads from and publishes to the Hub, since its nodes cannot see this machine's directories; give Hub repo ids for both")
    if importlib.util.find_spec("ray") is None:
        raise StreamqError('cluster needs Ray: pip install "streamq[ray]" (here and on every node)')


def job_context(api: HfApi, source: str, revision: str, output: str, branch: str | None, device: str, disk_budget: int | None) -> JobContext:
    """What the jobs need besides the plan; the nodes get this run's token (they download and upload)."""
    import torch

    from .. import __version__

    token = api.token if isinstance(api.token, str) else (get_token() if api.token is None else None)
    return JobContext(api.endpoint, token, source, revision, output, branch, device, disk_budget, __version__, torch.get_num_threads())


def cluster_scheduler(address: str, *args: Any) -> ClusterScheduler:
    from .driver import ClusterScheduler

    return ClusterScheduler(address, *args)
