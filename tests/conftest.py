import os
import sys
from pathlib import Path

# Read by huggingface_hub at import: plain LFS against the emulator, no telemetry, no real cache.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
sys.path.insert(0, str(Path(__file__).parent))

# bitsandbytes 0.50 switches CPU inference to an AVX512-BF16 repacked layout on CPUs that have it, and that
# repacking fails for in_features not a multiple of the block size (our tiny models' 96-wide MLPs): a bug of
# bitsandbytes' forward pass that hits transformers' own 4-bit models the same way. Forward passes in these tests
# take the portable path so that they compare the models on every CPU; the bytes on disk do not depend on it.
import bitsandbytes.nn.modules as _bnb_modules  # noqa: E402

_bnb_modules.has_avx512bf16 = lambda: False



import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_work_root(tmp_path_factory: pytest.TempPathFactory):
    """Default work folders of module-scoped fixtures' runs go under the session's temp dir, not the machine's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STREAMQ_WORK_DIR", str(tmp_path_factory.mktemp("session-work-root")))
        yield


@pytest.fixture(autouse=True)
def work_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's runs keep their default work folders under a root of its own (subprocesses inherit it),
    so that no test finds another's."""
    root = tmp_path_factory.mktemp("work-root")
    monkeypatch.setenv("STREAMQ_WORK_DIR", str(root))
    return root
