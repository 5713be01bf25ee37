"""The neutral tensor API on NumPy arrays, for work done on the host.

Algorithms may run parts of their arithmetic here when the framework's own kernels are the
slower choice for small, many-op linear algebra (MindSpore on a CPU runs each PyNative op with
a millisecond of overhead; RPG's rank term is dozens of small ops per layer). NumPy has no
autograd: :meth:`NumpyOps.value_and_grad` is not available.
"""
from __future__ import annotations

import numpy as np

from prunekit.contract.ops import Ops

_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class NumpyOps(Ops):
    name = "numpy"

    def asarray(self, data, dtype="float32", like=None):
        return np.asarray(data, dtype=_DTYPES[dtype])

    def to_numpy(self, x):
        return np.array(x, copy=True)

    def zeros(self, shape, dtype="float32", like=None):
        return np.zeros(tuple(shape), _DTYPES[dtype])

    def ones(self, shape, dtype="float32", like=None):
        return np.ones(tuple(shape), _DTYPES[dtype])

    def arange(self, n, dtype="int64", like=None):
        return np.arange(n, dtype=_DTYPES[dtype])

    def random_normal(self, shape, seed, like=None):
        return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)

    def random_uniform(self, shape, seed, like=None):
        return np.random.default_rng(seed).random(tuple(shape)).astype(np.float32)

    def parameter(self, data, name):
        return np.array(data, dtype=np.float32)

    def cast(self, x, dtype):
        return np.asarray(x).astype(_DTYPES[dtype])

    def stop_gradient(self, x):
        return x

    def dtype(self, x):
        return np.asarray(x).dtype.name if np.asarray(x).dtype != np.bool_ else "bool"

    def item(self, x):
        return np.asarray(x).item()

    def abs(self, x):
        return np.abs(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def sigmoid(self, x):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.asarray(x).dtype)

    def sign(self, x):
        return np.sign(x)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def clip(self, x, lo, hi):
        return np.clip(x, lo, hi)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def isfinite(self, x):
        return np.isfinite(x)

    def greater(self, a, b):
        return np.greater(a, b)

    def greater_equal(self, a, b):
        return np.greater_equal(a, b)

    def less_equal(self, a, b):
        return np.less_equal(a, b)

    def equal(self, a, b):
        return np.equal(a, b)

    def logical_and(self, a, b):
        return np.logical_and(a, b)

    def logical_or(self, a, b):
        return np.logical_or(a, b)

    def logical_not(self, a):
        return np.logical_not(a)

    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return np.mean(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return np.min(x, axis=axis, keepdims=keepdims)

    def argmax(self, x, axis):
        return np.argmax(x, axis=axis)

    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis, dtype=np.asarray(x).dtype)

    def shape(self, x):
        return tuple(np.shape(x))

    def reshape(self, x, shape):
        return np.reshape(x, tuple(shape))

    def transpose(self, x, perm):
        return np.transpose(x, tuple(perm))

    def concat(self, xs, axis=0):
        return np.concatenate(list(xs), axis=axis)

    def stack(self, xs, axis=0):
        return np.stack(list(xs), axis=axis)

    def take(self, x, indices, axis):
        return np.take(x, np.asarray(indices, dtype=np.int64), axis=axis)

    def flip(self, x, axis):
        # a copy, not np.flip's negative-stride view: np.matmul cannot hand negative strides to
        # BLAS and falls back to a loop ~10x slower (the spectra's flipped eigenvector bases)
        return np.ascontiguousarray(np.flip(x, axis=axis))

    def matmul(self, a, b):
        return np.matmul(a, b)

    def _svd(self, x):
        return np.linalg.svd(x, full_matrices=False)

    def qr(self, x):
        return np.linalg.qr(x)

    def eigh(self, x):
        return np.linalg.eigh(x)

    def sort_descending(self, x):
        return np.sort(x)[::-1]

    def value_and_grad(self, loss_fn, params):
        raise NotImplementedError("NumpyOps has no autograd; use a framework backend's ops")
