"""The MindSpore backend (CPU, GPU and Ascend; PyNative mode).

On import, and only if the process has not chosen yet:

* the device is set with ``mindspore.set_device``: ``PRUNEKIT_MS_DEVICE`` ("CPU", "GPU" or
  "Ascend"), else CPU. A device already chosen with ``mindspore.set_device`` is kept.
* on CPU, oneDNN is capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) unless ``ONEDNN_MAX_CPU_ISA``
  is set already or ``PRUNEKIT_MS_ONEDNN_ISA`` names another cap ("default" leaves oneDNN
  alone). MindSpore hands oneDNN plain NCHW tensors, for which oneDNN 3.x on AVX-512 CPUs picks
  a reference convolution ("jit_uni_ncsp:conv+ref") about 70x slower than its AVX2 GEMM
  convolution. oneDNN reads the variable at its first primitive, so it only helps if set before
  the first convolution of the process; it then applies to every library in the process using
  oneDNN (PyTorch's CPU kernels included; its ResNet-20 step time did not change measurably).
* on CPU, NumPy's OpenBLAS (the host rank machinery's) is set to one thread unless
  ``OPENBLAS_NUM_THREADS`` is set or ``PRUNEKIT_MS_HOST_BLAS_THREADS`` names another count
  ("default" leaves it alone): see :mod:`prunekit.backends.mindspore.hostblas`.

The execution mode is left as it is (MindSpore's default is PyNative, which the driver needs).
"""
from __future__ import annotations

import os


def _configure() -> None:
    import mindspore as ms

    try:
        from mindspore._c_expression import DeviceManagerConf
        chosen = DeviceManagerConf.get_instance().is_device_enable()
    except Exception:  # private API moved: only an explicit request changes the device
        chosen = "PRUNEKIT_MS_DEVICE" not in os.environ
    if not chosen:
        target = os.environ.get("PRUNEKIT_MS_DEVICE", "CPU")
        target = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend", "npu": "Ascend"}.get(target.lower(), target)
        try:
            ms.set_device(target)
        except RuntimeError:  # the runtime already started on its default device: keep that one
            pass
    if ms.get_context("device_target") == "CPU" and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        isa = os.environ.get("PRUNEKIT_MS_ONEDNN_ISA", "AVX2")
        if isa.lower() != "default":
            os.environ["ONEDNN_MAX_CPU_ISA"] = isa
    if ms.get_context("device_target") == "CPU" and "OPENBLAS_NUM_THREADS" not in os.environ:
        threads = os.environ.get("PRUNEKIT_MS_HOST_BLAS_THREADS", "1")
        if threads.lower() != "default":  # NumPy's BLAS threads would compete with MindSpore's
            from .hostblas import limit_host_blas_threads
            limit_host_blas_threads(int(threads))


_configure()

from .driver import (Adam, PruningCallback, PruningSession, PruningTrainOneStepCell, Trainer,  # noqa: E402
                     make_optimizer)
from .layers import MindSporeModelHandle, discover_layers  # noqa: E402
from .compact import compact  # noqa: E402
from .timing import time_inference  # noqa: E402
from . import checkpoint  # noqa: E402
from .models import build_model  # noqa: E402
from .ops import MindSporeOps, check_device  # noqa: E402
from .surgery import apply_decompositions  # noqa: E402

NAME = "mindspore"
Ops = MindSporeOps


def model_handle(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, seed: int = 0,
                 device: str | None = None, width: int = 1) -> MindSporeModelHandle:
    """Build a reference model with the shared seeded initialisation and wrap it in a handle.

    ``device`` must be the process's MindSpore device (see :func:`check_device`), or None.
    """
    check_device(device)
    model = build_model(name, num_classes, in_channels, width)
    handle = MindSporeModelHandle(model, (in_channels, image_size, image_size), name)
    handle.initialize(seed)
    return handle
