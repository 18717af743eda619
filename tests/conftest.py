import os
import sys
from pathlib import Path

# Read by huggingface_hub at import: plain LFS against the emulator, no telemetry, no real cache.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
sys.path.insert(0, str(Path(__file__).parent))
