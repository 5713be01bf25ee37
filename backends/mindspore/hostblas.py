"""Thread count of NumPy's own BLAS (OpenBLAS) in a process that trains with MindSpore on a CPU.

The rank machinery runs its matrix work on the host in NumPy (``prefers_host_linalg``). NumPy's
OpenBLAS keeps its worker threads spinning for a while after each multithreaded call, and on a
small CPU they then compete with MindSpore's own compute threads for the step that follows:
measured on 2 cores (ResNet-56, batch 128), RPG's and TRP's steps cost 1.12x a plain step with
NumPy's default of 2 BLAS threads and 1.01-1.02x with 1. :func:`limit_host_blas_threads` sets
the count at run time through OpenBLAS's ``openblas_set_num_threads`` (the environment variable
``OPENBLAS_NUM_THREADS`` is only read when NumPy is first imported, usually before this backend).
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import List, Optional


def _openblas_libraries() -> List[ctypes.CDLL]:
    import numpy
    base = os.path.dirname(numpy.__file__)
    paths = sorted(glob.glob(os.path.join(base, os.pardir, "numpy.libs", "libopenblas*.so*")))
    paths += sorted(glob.glob(os.path.join(base, ".libs", "libopenblas*.so*")))
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _symbol(lib: ctypes.CDLL, name: str):
    for suffix in ("64_", ""):  # NumPy's wheels build OpenBLAS with 64-bit ints and a "64_" suffix
        fn = getattr(lib, name + suffix, None)
        if fn is not None:
            return fn
    return None


def host_blas_threads() -> Optional[int]:
    """NumPy's OpenBLAS thread count, or None if NumPy does not bundle an OpenBLAS found here."""
    for lib in _openblas_libraries():
        fn = _symbol(lib, "openblas_get_num_threads")
        if fn is not None:
            return int(fn())
    return None


def limit_host_blas_threads(n: int = 1) -> bool:
    """Set NumPy's OpenBLAS to ``n`` threads; False (nothing changed) if it was not found."""
    done = False
    for lib in _openblas_libraries():
        fn = _symbol(lib, "openblas_set_num_threads")
        if fn is not None:
            fn(int(n))
            done = True
    return done
