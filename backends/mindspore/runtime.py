"""Process-wide settings of the MindSpore backend: :func:`configure_process`, which the package
calls once on import, and the NumPy BLAS thread control it uses.

:func:`configure_process` does, each only if the process has not chosen yet:

* the device is set with ``mindspore.set_device``: ``PRUNEKIT_MS_DEVICE`` ("CPU", "GPU" or
  "Ascend", any case), else CPU. A device already chosen with ``mindspore.set_device`` is kept.
* on CPU, oneDNN is capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) unless ``ONEDNN_MAX_CPU_ISA``
  is set already or ``PRUNEKIT_MS_ONEDNN_ISA`` names another cap ("default" leaves oneDNN
  alone). MindSpore hands oneDNN plain NCHW tensors, for which oneDNN 3.x on AVX-512 CPUs picks
  a reference convolution ("jit_uni_ncsp:conv+ref") about 70x slower than its AVX2 GEMM
  convolution. oneDNN reads the variable at its first primitive, so it only helps if set before
  the first convolution of the process; it then applies to every library in the process using
  oneDNN (PyTorch's CPU kernels included; its ResNet-20 step time did not change measurably).
* on CPU, NumPy's OpenBLAS is set to one thread unless ``OPENBLAS_NUM_THREADS`` is set or
  ``PRUNEKIT_MS_HOST_BLAS_THREADS`` names another count ("default" leaves it alone). The rank
  machinery runs its matrix work on the host in NumPy (``prefers_host_linalg``); NumPy's OpenBLAS
  keeps its worker threads spinning for a while after each multithreaded call, and on a small
  CPU they then compete with MindSpore's own compute threads for the step that follows:
  measured on 2 cores (ResNet-56, batch 128), RPG's and TRP's steps cost 1.12x a plain step with
  NumPy's default of 2 BLAS threads and 1.01-1.02x with 1. :func:`limit_host_blas_threads` sets
  the count at run time through OpenBLAS's ``openblas_set_num_threads`` (the environment
  variable is only read when NumPy is first imported, usually before this backend).

The execution mode is left as it is (MindSpore's default is PyNative, which the driver needs).
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import List, Optional

import mindspore as ms

from .ops import _DEVICE_ALIASES, check_device  # noqa: F401  (the backend's check_device)


def configure_process() -> None:
    """Choose the device, cap oneDNN's ISA and NumPy's BLAS threads on CPU (see the module doc)."""
    try:
        from mindspore._c_expression import DeviceManagerConf
        chosen = DeviceManagerConf.get_instance().is_device_enable()
    except Exception:  # private API moved: only an explicit request changes the device
        chosen = "PRUNEKIT_MS_DEVICE" not in os.environ
    if not chosen:
        target = os.environ.get("PRUNEKIT_MS_DEVICE", "CPU")
        try:
            ms.set_device(_DEVICE_ALIASES.get(target.lower(), target))
        except RuntimeError:  # the runtime already started on its default device: keep that one
            pass
    if ms.get_context("device_target") != "CPU":
        return
    if "ONEDNN_MAX_CPU_ISA" not in os.environ:
        isa = os.environ.get("PRUNEKIT_MS_ONEDNN_ISA", "AVX2")
        if isa.lower() != "default":
            os.environ["ONEDNN_MAX_CPU_ISA"] = isa
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        threads = os.environ.get("PRUNEKIT_MS_HOST_BLAS_THREADS", "1")
        if threads.lower() != "default":
            limit_host_blas_threads(int(threads))


# ---------------------------------------------------------------------------- NumPy's OpenBLAS
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
