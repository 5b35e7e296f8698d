"""Build of the native modules: ``tamiyo.policy._fused`` (the fused CPU forward),
``tamiyo.policy._features`` (the featurizer's telemetry columns) and
``tamiyo.policy._ingest`` (the usual telemetry frame into a session's window).

Everything else about the package is in pyproject.toml. The module is compiled for the
machine that installs it (``-march=native``: AVX-512 or AVX2 where present), which is
right for ``make setup`` and CI; an image built on one machine and run on others sets
``TAMIYO_MARCH`` (e.g. ``x86-64-v3``) or ``TAMIYO_MARCH=none`` for the compiler's default.
Without a C compiler the package still installs and serves: the engine falls back to the
compiled TorchScript forward (``tamiyo/policy/fused.py``), the featurizer and the frame
path to numpy.
"""

import os
import platform

import numpy
from setuptools import Extension, setup

march = os.environ.get("TAMIYO_MARCH", "native")
if march not in ("native", "none") and platform.machine().lower() not in ("x86_64", "amd64"):
    march = "native"  # an x86 level named for an image built on another architecture
flags = ["-O3", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wno-psabi"]
if march != "none":
    flags.append(f"-march={march}")

setup(
    ext_modules=[
        Extension(
            f"tamiyo.policy.{name}",
            sources=[f"tamiyo/policy/{name}.c"],
            include_dirs=[numpy.get_include()],  # the numpy C API (arrays in and out)
            extra_compile_args=flags,
            optional=True,  # no compiler: install anyway, run the torch / numpy paths
        )
        for name in ("_fused", "_features", "_ingest")
    ]
)
