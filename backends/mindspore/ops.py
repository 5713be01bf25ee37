"""The neutral tensor API on MindSpore tensors (CPU, GPU or Ascend: the device is MindSpore's
process-wide target, so the ``like`` arguments are accepted for symmetry and not needed).

Only ``mindspore.ops`` functions documented for all three platforms are used on the device path
(eigh excepted, see below). Points that carry a convention or a platform gap:

* ``argmax`` is built from ``amax`` + an index minimum, so "first index on ties" holds on every
  platform by construction instead of depending on a kernel's tie behaviour (and NaN counts
  as the maximum, as in NumPy and PyTorch).
* ``_svd``: ``mindspore.ops.svd`` returns ``(S, U, V)`` with V *not* transposed; it is
  reordered to ``(U, S, Vh)``. Because MindSpore's SVD has not worked on every Ascend release,
  ``MindSporeOps(svd="host")`` or ``PRUNEKIT_MS_SVD=host`` computes it in NumPy (float64) on the
  host instead. The same switch exists for ``qr`` (``PRUNEKIT_MS_QR``) and ``eigh``
  (``PRUNEKIT_MS_EIGH``). MindSpore has no batched eigh and none at all on Ascend
  (``mindspore.scipy.linalg.eigh`` is CPU/GPU only), so eigh's default ``"auto"`` loops over the
  batch on CPU/GPU and uses the host on Ascend. Host results are not differentiable.
* Parameters are modified with ``Tensor.copy_`` (see ``layers.py``): ``Tensor.mul_`` silently
  leaves a Parameter unchanged in MindSpore 2.10 PyNative.
* ``kth_largest`` uses ``topk`` (a partial sort, on -x past the middle): on 20M scores it is
  about 8x faster than a full ``sort`` on CPU.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import numpy as np
import mindspore as ms
from mindspore import ops as msops
from mindspore.ops import operations as P

from prunekit.errors import ConfigError
from prunekit.contract.ops import Ops

_DTYPES = {
    "float32": ms.float32, "float64": ms.float64, "int32": ms.int32, "int64": ms.int64,
    "bool": ms.bool_, "float16": ms.float16, "bfloat16": ms.bfloat16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_NP = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
       "bool": np.bool_, "float16": np.float16}

LINALG_MODES = ("device", "host")


def _axis(axis):
    return tuple(axis) if isinstance(axis, list) else axis


def _mode(op: str, value: str | None, default: str, allowed=LINALG_MODES) -> str:
    value = value if value is not None else os.environ.get(f"PRUNEKIT_MS_{op.upper()}", default)
    value = str(value).lower()
    if value not in allowed:
        raise ConfigError(f"MindSporeOps {op} mode must be one of {', '.join(allowed)}, got {value!r}")
    return value


_DEVICE_ALIASES = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend", "npu": "Ascend"}


def device_target() -> str:
    return ms.get_context("device_target")


def check_device(device: str | None) -> None:
    """MindSpore has one device per process: accept ``device`` only if it is that one.

    ``"cuda:0"``-style suffixes are ignored; choose the device with ``PRUNEKIT_MS_DEVICE`` (or
    ``mindspore.set_device``) before the backend is imported.
    """
    if not device:
        return
    key = str(device).split(":", 1)[0].lower()
    want = _DEVICE_ALIASES.get(key)
    if want is None:
        raise ConfigError(f"unknown device {device!r} for the mindspore backend; expected cpu, gpu or ascend")
    if want != device_target():
        raise ConfigError(f"the mindspore backend runs on {device_target()} in this process, not {want}; "
                          f"set PRUNEKIT_MS_DEVICE={want} before importing it")


class MindSporeOps(Ops):
    name = "mindspore"

    def __init__(self, svd: str | None = None, qr: str | None = None, eigh: str | None = None):
        """``svd``/``qr``: "device" (default) or "host"; ``eigh``: "auto" (default), "device" or "host".

        Each defaults to the environment variable ``PRUNEKIT_MS_SVD`` / ``_QR`` / ``_EIGH``.
        """
        self.svd_mode = _mode("svd", svd, "device")
        self.qr_mode = _mode("qr", qr, "device")
        self.eigh_mode = _mode("eigh", eigh, "auto", LINALG_MODES + ("auto",))

    @property
    def prefers_host_linalg(self) -> bool:
        """On a CPU, many small PyNative ops cost more than a host copy: RPG/TRP's rank term runs
        faster in NumPy there (``rank_on="auto"``). On Ascend/GPU the device is used."""
        return ms.get_context("device_target") == "CPU"

    def on_accelerator(self, x):
        return ms.get_context("device_target") != "CPU"

    # creation / conversion
    def asarray(self, data, dtype="float32", like=None):
        if isinstance(data, ms.Tensor):
            return data if data.dtype == _DTYPES[dtype] else msops.cast(data, _DTYPES[dtype])
        arr = np.asarray(data)
        if dtype in _NP:
            return ms.Tensor(arr.astype(_NP[dtype], copy=False))
        return ms.Tensor(arr.astype(np.float32), dtype=_DTYPES[dtype])

    def to_numpy(self, x):
        if x.dtype == ms.bfloat16:
            x = msops.cast(x, ms.float32)
        return x.asnumpy().copy()

    def zeros(self, shape, dtype="float32", like=None):
        return msops.zeros(tuple(int(d) for d in shape), _DTYPES[dtype])

    def ones(self, shape, dtype="float32", like=None):
        return msops.ones(tuple(int(d) for d in shape), _DTYPES[dtype])

    def arange(self, n, dtype="int64", like=None):
        return msops.arange(0, int(n), 1, dtype=_DTYPES[dtype])

    # A fresh primitive per call: its generator state starts from the seed every time, so
    # equal seeds give equal samples regardless of earlier calls or mindspore.set_seed.
    def random_normal(self, shape, seed, like=None):
        return P.StandardNormal(seed=int(seed), seed2=0)(tuple(int(d) for d in shape))

    def random_uniform(self, shape, seed, like=None):
        return P.UniformReal(seed=int(seed), seed2=0)(tuple(int(d) for d in shape))

    def parameter(self, data, name):
        return ms.Parameter(ms.Tensor(np.asarray(data, dtype=np.float32)), name=str(name))

    def cast(self, x, dtype):
        return msops.cast(x, _DTYPES[dtype])

    def stop_gradient(self, x):
        return msops.stop_gradient(x)

    def dtype(self, x):
        return _NAMES[x.dtype]

    def item(self, x):
        return x.item()

    # elementwise
    def abs(self, x):
        return msops.abs(x)

    def sqrt(self, x):
        return msops.sqrt(x)

    def exp(self, x):
        return msops.exp(x)

    def log(self, x):
        return msops.log(x)

    def sigmoid(self, x):
        return msops.sigmoid(x)

    def sign(self, x):
        return msops.sign(x)

    def maximum(self, a, b):
        return msops.maximum(a, b)

    def minimum(self, a, b):
        return msops.minimum(a, b)

    def clip(self, x, lo, hi):
        return msops.clamp(x, lo, hi)

    def where(self, cond, a, b):
        return msops.where(cond, a, b)

    def isfinite(self, x):
        return msops.isfinite(x)

    # comparison / logic
    def greater(self, a, b):
        return msops.greater(a, b)

    def greater_equal(self, a, b):
        return msops.greater_equal(a, b)

    def less_equal(self, a, b):
        return msops.less_equal(a, b)

    def equal(self, a, b):
        return msops.equal(a, b)

    def logical_and(self, a, b):
        return msops.logical_and(a, b)

    def logical_or(self, a, b):
        return msops.logical_or(a, b)

    def logical_not(self, a):
        return msops.logical_not(a)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return msops.sum(x, _axis(axis), keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return msops.mean(x, _axis(axis), keepdims)

    def max(self, x, axis=None, keepdims=False):
        return msops.amax(x, axis, keepdims)

    def min(self, x, axis=None, keepdims=False):
        return msops.amin(x, axis, keepdims)

    def argmax(self, x, axis):
        # smallest index whose value equals the maximum (NaN, if any, counts as the maximum)
        nd = x.ndim
        ax = axis % nd
        n = x.shape[ax]
        nan = msops.isnan(x)
        has_nan = msops.any(nan, ax, keep_dims=True)
        hit = msops.where(has_nan, nan, msops.equal(x, msops.amax(x, ax, True)))
        index = msops.reshape(msops.arange(0, n, 1, dtype=ms.int64), (n,) + (1,) * (nd - 1 - ax))
        candidates = msops.where(hit, index, msops.full_like(index, n))
        return msops.amin(candidates, ax, False)

    def cumsum(self, x, axis):
        return msops.cumsum(x, axis, dtype=x.dtype)

    # shape
    def shape(self, x):
        return tuple(int(d) for d in x.shape)

    def reshape(self, x, shape):
        return msops.reshape(x, tuple(int(d) for d in shape))

    def transpose(self, x, perm):
        return msops.transpose(x, tuple(int(p) for p in perm))

    def concat(self, xs, axis=0):
        return msops.concat(tuple(xs), axis)

    def stack(self, xs, axis=0):
        return msops.stack(tuple(xs), axis)

    def take(self, x, indices, axis):
        if not isinstance(indices, ms.Tensor):
            indices = ms.Tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return msops.gather(x, indices, axis % x.ndim)

    # MindSpore's Python indexing costs milliseconds per call in PyNative: native ops instead
    def head(self, x, k):
        return msops.narrow(x, x.ndim - 1, 0, k)

    def unstack(self, x):
        return list(msops.unstack(x, 0))

    def flip(self, x, axis):
        return msops.flip(x, (axis % x.ndim,))

    # linear algebra
    def matmul(self, a, b):
        return msops.matmul(a, b)

    def _svd(self, x):
        if self.svd_mode == "host":
            u, s, vh = np.linalg.svd(self.to_numpy(x).astype(np.float64), full_matrices=False)
            return self._from_host(x, u, s, vh)
        s, u, v = msops.svd(x, full_matrices=False, compute_uv=True)
        return u, s, self.swap_last(v)

    def qr(self, x):
        if self.qr_mode == "host":
            q, r = np.linalg.qr(self.to_numpy(x).astype(np.float64), mode="reduced")
            return self._from_host(x, q, r)
        return msops.qr(x, mode="reduced")

    def eigh(self, x):
        mode = self.eigh_mode
        if mode == "auto":
            mode = "host" if device_target() == "Ascend" else "device"
        if mode == "host":
            w, v = np.linalg.eigh(self.to_numpy(x).astype(np.float64))
            return self._from_host(x, w, v)
        from mindspore.scipy.linalg import eigh as _eigh  # 2-D only, CPU/GPU only
        shape = self.shape(x)
        if len(shape) == 2:
            return _eigh(x)
        flat = msops.reshape(x, (-1,) + shape[-2:])
        pairs = [_eigh(flat[i]) for i in range(flat.shape[0])]
        w = msops.stack([p[0] for p in pairs], 0)
        v = msops.stack([p[1] for p in pairs], 0)
        return msops.reshape(w, shape[:-1]), msops.reshape(v, shape)

    def _from_host(self, like, *arrays):
        return tuple(ms.Tensor(np.ascontiguousarray(a).astype(np.float32), dtype=like.dtype) for a in arrays)

    # ordering
    def sort_descending(self, x):
        return msops.sort(x, axis=-1, descending=True)[0]

    def kth_largest(self, x, k):
        # top-k values come sorted largest first; for k past the middle the (n-k+1)-th smallest
        # is found the same way on -x, which keeps the partial sort short
        n, k = int(x.shape[0]), int(k)
        if ms.get_context("device_target") == "CPU":
            # MindSpore's CPU top-k is ~30x slower than a host partial sort (15.6 s against 0.5 s for
            # 5.5M of 11M floats); on CPU the tensor is host memory already, and the value is the same
            host = x.asnumpy()
            return ms.Tensor(np.partition(host, n - k)[n - k:n - k + 1].reshape(()), dtype=x.dtype)
        if 2 * k <= n + 1:
            return msops.topk(x, k, sorted=True)[0][k - 1]
        return -msops.topk(-x, n - k + 1, sorted=True)[0][n - k]

    # gradients
    def hessian_vector_product(self, loss_fn, params, vector):
        # Nested ms.grad is not reliable in MindSpore 2.10 on CPU (measured on prunekit's models):
        # max-pool has no second-order kernel ("MaxPoolGradGrad does not support on CPU"), eval-mode
        # BatchNorm's BatchNormGradGrad kernel fails, and train-mode BatchNorm gives a product 72 %
        # (relative L2) away from PyTorch's double backward on ResNet-20. Refuse rather than be wrong.
        from prunekit.errors import ModelError
        raise ModelError("the mindspore backend has no reliable Hessian-vector product in MindSpore "
                         f"{ms.__version__} (second-order kernels for max-pool and BatchNorm are missing or "
                         "disagree with PyTorch); GraSP needs one: use score=snip or synflow, or the torch backend")

    def value_and_grad(self, loss_fn: Callable, params: Dict[str, ms.Parameter]):
        names = list(params)
        weights = [params[n] for n in names]
        # an eager closure (pruning-at-initialisation scores): GRAPH_MODE cannot compile it
        # ("Illegal AnfNode"), so it runs in PyNative whatever mode the user set
        mode = ms.get_context("mode")
        if mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            loss, grads = ms.value_and_grad(loss_fn, None, weights)()
        finally:
            if mode != ms.PYNATIVE_MODE:
                ms.set_context(mode=mode)
        return float(loss.asnumpy()), dict(zip(names, grads))
