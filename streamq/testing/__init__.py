"""A loopback Hugging Face Hub for tests: the real `huggingface_hub` client talks to it over HTTP.

    with LocalHub(tmp_path) as hub:
        api = HfApi(endpoint=hub.endpoint)
        hub.faults.add(Fault.status(503, method="HEAD", path=r"/resolve/"))

Set `HF_HUB_DISABLE_XET=1` before importing huggingface_hub: the emulator speaks plain git-LFS, not Xet.
"""

from .faults import Fault, FaultSet
from .protocol import RequestLog, RequestRecord
from .server import LocalHub

__all__ = ["Fault", "FaultSet", "LocalHub", "RequestLog", "RequestRecord"]
