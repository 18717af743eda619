"""The compiled part of the build (everything else is in pyproject.toml): streamq's CPU kernel, plain C
that streamq loads with ctypes. Optional: if it cannot be built the install still succeeds and
bitsandbytes quantizes instead; why it was not built is recorded beside it, for streamq to say at run
time. No -ffast-math: the bytes must be bitsandbytes'."""

import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BUILD_RECORD = "_quant4_build_error.txt"  # read by streamq/kernels/cpu.py


class RecordingBuildExt(build_ext):
    """build_ext that writes down why an optional extension failed (setuptools only warns, and pip hides it)."""

    def build_extension(self, ext: Extension) -> None:
        # Beside the built library (what a wheel ships) and beside its source (what an editable install imports).
        records = {Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_RECORD), Path(ext.sources[0]).with_name(BUILD_RECORD)}
        try:
            super().build_extension(ext)
        except Exception as exc:
            why = self._why(ext, exc)
            for record in records:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(why + "\n")
            raise
        for record in records:
            record.unlink(missing_ok=True)

    def _why(self, ext: Extension, exc: Exception) -> str:
        command = (getattr(self.compiler, "compiler_so", None) or ["cc"])[0]
        if shutil.which(command) is None:
            return f"no C compiler was found (the build looked for {command!r})"
        check = subprocess.run([command, "-fsyntax-only", *ext.sources], capture_output=True, text=True)
        errors = [line.strip() for line in (check.stderr + str(exc)).splitlines() if "error" in line]
        return f"the C compiler ({command}) failed: {errors[0] if errors else type(exc).__name__}"


setup(
    cmdclass={"build_ext": RecordingBuildExt},
    ext_modules=[
        Extension(
            "streamq.kernels._quant4",
            sources=["streamq/kernels/quant4.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
