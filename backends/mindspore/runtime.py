"""Process-wide settings of the MindSpore backend: :func:`configure_process`, which the package
calls once on import, and the NumPy BLAS thread control it uses.

:func:`configure_process` does, each only if the process has not chosen yet:

* the device is the one the user chose, by whichever means: ``mindspore.set_device`` (kept),
  ``mindspore.set_context(device_target=...)`` before or after the import (kept: prunekit does
  not call ``set_device`` then, which would override it), or ``PRUNEKIT_MS_DEVICE`` ("CPU",
  "GPU" or "Ascend", any case; applied with ``mindspore.set_device`` unless ``set_device`` was
  called already). With none of them, MindSpore's own default stands. ``PRUNEKIT_MS_DEVICE``
  naming another device than ``set_device`` chose is a :class:`~prunekit.errors.ConfigError`.
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

from prunekit.errors import ConfigError

from .ops import _DEVICE_ALIASES, check_device  # noqa: F401  (the backend's check_device)


def _set_device_called() -> Optional[bool]:
    """Whether ``mindspore.set_device`` ran in this process (None: MindSpore's private API moved)."""
    try:
        from mindspore._c_expression import DeviceManagerConf
        return bool(DeviceManagerConf.get_instance().is_device_enable())
    except Exception:
        return None


def choose_device() -> None:
    """Apply ``PRUNEKIT_MS_DEVICE`` if set; otherwise leave the device to the user (see the module doc)."""
    requested = os.environ.get("PRUNEKIT_MS_DEVICE")
    if not requested:
        return
    target = _DEVICE_ALIASES.get(requested.lower())
    if target is None:
        raise ConfigError(f"PRUNEKIT_MS_DEVICE={requested!r} is not a MindSpore device; expected CPU, GPU or Ascend")
    called = _set_device_called()
    if not called:  # None: cannot be told; set_device itself refuses to change an earlier choice
        try:
            ms.set_device(target)
        except RuntimeError:  # an earlier set_device, or the runtime already started
            pass
    current = ms.get_context("device_target")
    if current != target:
        how = "mindspore.set_device" if called else "MindSpore (its runtime had already started)"
        raise ConfigError(f"PRUNEKIT_MS_DEVICE={requested!r} asks for {target}, but {how} chose {current} in "
                          f"this process; unset one of them, or set PRUNEKIT_MS_DEVICE before MindSpore runs")


def configure_process() -> None:
    """Respect the device chosen, cap oneDNN's ISA and NumPy's BLAS threads on CPU (see the module doc)."""
    choose_device()
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
