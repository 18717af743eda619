"""When the C kernel cannot be built, the install still works and streamq says why (not only "no compiler")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamq.kernels import cpu

ROOT = Path(__file__).resolve().parent.parent


def _build(tmp_path: Path, source: str, **env: str) -> str | None:
    """Build the extension with the project's setup.py from `source`; the record it leaves, if any."""
    (tmp_path / "streamq" / "kernels").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "setup.py", tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "kb"\nversion = "0"\n[tool.setuptools]\npackages = []\n')
    (tmp_path / "streamq" / "kernels" / "quant4.c").write_text(source)
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env={**os.environ, **env},
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr  # optional: a failed kernel never fails the install
    record = tmp_path / "streamq" / "kernels" / cpu.BUILD_RECORD
    return record.read_text().strip() if record.exists() else None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the cases that compile need gcc, which CI has")
def test_the_build_records_a_missing_compiler_a_compiler_error_or_nothing(tmp_path: Path) -> None:
    assert _build(tmp_path / "a", "int x;\n", CC="/nonexistent/cc") == "no C compiler was found (the build looked for '/nonexistent/cc')"
    broken = _build(tmp_path / "b", "#error deliberately broken\n", CC="gcc")
    assert broken is not None and broken.startswith("the C compiler (gcc) failed:") and "#error deliberately broken" in broken
    assert _build(tmp_path / "b", (ROOT / "streamq" / "kernels" / "quant4.c").read_text(), CC="gcc") is None  # fixed: the record goes
    assert list((tmp_path / "b" / "streamq" / "kernels").glob("_quant4*.so"))


def test_the_warning_says_the_recorded_reason(tmp_path: Path) -> None:
    record = tmp_path / cpu.BUILD_RECORD
    record.write_text("the C compiler (gcc) failed: quant4.c:1:2: error: boom\n")
    assert cpu.not_built_reason(record) == "the C compiler (gcc) failed: quant4.c:1:2: error: boom when streamq was installed"
    assert "no build of it was attempted" in cpu.not_built_reason(tmp_path / "missing.txt")
