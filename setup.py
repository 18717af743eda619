"""The compiled part of the build (everything else is in pyproject.toml): streamq's CPU kernel, plain C
that streamq loads with ctypes. Optional: without a C compiler the install still succeeds and
bitsandbytes quantizes instead. No -ffast-math: the bytes must be bitsandbytes'."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streamq.kernels._quant4",
            sources=["streamq/kernels/quant4.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
