"""Build of the compiled core (Cython). Metadata lives in pyproject.toml.

Knobs, by environment variable:
  MSIGHT_FAST_DEBUG=1      -O0 -g, Cython bounds/wraparound checks back on everywhere
  MSIGHT_FAST_ANNOTATE=1   write the Cython HTML annotation next to each .pyx
  MSIGHT_FAST_SANITIZE=... e.g. "address,undefined": build with -fsanitize=... (run with the
                           sanitizer runtime preloaded; see ci/sanitize.sh)
"""
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("MSIGHT_FAST_DEBUG") == "1"
annotate = os.environ.get("MSIGHT_FAST_ANNOTATE") == "1"
sanitize = os.environ.get("MSIGHT_FAST_SANITIZE", "")

cflags, ldflags = [], []
if sys.platform != "win32":
    cflags += ["-O0", "-g3"] if debug else ["-O3", "-g0"]
    cflags += ["-fno-strict-aliasing", "-Wno-unused-function"]
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        ldflags += [f"-fsanitize={sanitize}"]

extensions = [
    Extension(
        "msight_fast._ext._wire",
        ["msight_fast/_ext/_wire.pyx"],
        include_dirs=[numpy.get_include(), "msight_fast/_ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=["msight_fast/_ext/_crc32c.h"],
    ),
    Extension(
        "msight_fast._ext._shm",
        ["msight_fast/_ext/_shm.pyx"],
        include_dirs=["msight_fast/_ext"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        depends=["msight_fast/_ext/_shm_sys.h"],
    ),
]

directives = {
    "language_level": 3,
    "embedsignature": True,
    # every index into a buffer is checked by hand against its length (see _wire.pyx), so the
    # generic checks are off; the debug build turns them back on to catch a missed one
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": not debug,
}

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=annotate,
                          force=debug or bool(sanitize)),
)
