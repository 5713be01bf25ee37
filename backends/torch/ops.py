"""The neutral tensor API on PyTorch tensors (CPU or CUDA: tensors stay on their device)."""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch

from prunekit.contract.ops import Ops

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _device(like):
    return like.device if isinstance(like, torch.Tensor) else None


def _axis(axis):
    return tuple(axis) if isinstance(axis, (list, tuple)) else axis


class TorchOps(Ops):
    name = "torch"

    # creation / conversion
    def on_accelerator(self, x):
        return x.device.type != "cpu"

    def asarray(self, data, dtype="float32", like=None):
        if isinstance(data, torch.Tensor):
            return data.to(device=_device(like) or data.device, dtype=_DTYPES[dtype])
        return torch.as_tensor(np.asarray(data), dtype=_DTYPES[dtype], device=_device(like))

    def to_numpy(self, x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy().copy()

    def zeros(self, shape, dtype="float32", like=None):
        return torch.zeros(tuple(shape), dtype=_DTYPES[dtype], device=_device(like))

    def ones(self, shape, dtype="float32", like=None):
        return torch.ones(tuple(shape), dtype=_DTYPES[dtype], device=_device(like))

    def arange(self, n, dtype="int64", like=None):
        return torch.arange(n, dtype=_DTYPES[dtype], device=_device(like))

    def random_normal(self, shape, seed, like=None):
        dev = _device(like) or torch.device("cpu")
        g = torch.Generator(device=dev).manual_seed(int(seed))
        return torch.randn(tuple(shape), generator=g, device=dev)

    def random_uniform(self, shape, seed, like=None):
        dev = _device(like) or torch.device("cpu")
        g = torch.Generator(device=dev).manual_seed(int(seed))
        return torch.rand(tuple(shape), generator=g, device=dev)

    def parameter(self, data, name):
        return torch.nn.Parameter(torch.as_tensor(np.asarray(data, dtype=np.float32)))

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def stop_gradient(self, x):
        return x.detach()

    def dtype(self, x):
        return _NAMES[x.dtype]

    def item(self, x):
        return x.item()

    # elementwise
    def abs(self, x):
        return torch.abs(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def exp(self, x):
        return torch.exp(x)

    def log(self, x):
        return torch.log(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def sign(self, x):
        return torch.sign(x)

    def maximum(self, a, b):
        return torch.maximum(a, b)

    def minimum(self, a, b):
        return torch.minimum(a, b)

    def clip(self, x, lo, hi):
        return torch.clamp(x, lo, hi)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def isfinite(self, x):
        return torch.isfinite(x)

    # comparison / logic
    def greater(self, a, b):
        return torch.gt(a, b)

    def greater_equal(self, a, b):
        return torch.ge(a, b)

    def less_equal(self, a, b):
        return torch.le(a, b)

    def equal(self, a, b):
        return torch.eq(a, b)

    def logical_and(self, a, b):
        return torch.logical_and(a, b)

    def logical_or(self, a, b):
        return torch.logical_or(a, b)

    def logical_not(self, a):
        return torch.logical_not(a)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return x.sum() if axis is None and not keepdims else torch.sum(x, dim=_axis(axis) if axis is not None else tuple(range(x.dim())), keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return x.mean() if axis is None and not keepdims else torch.mean(x, dim=_axis(axis) if axis is not None else tuple(range(x.dim())), keepdim=keepdims)

    def max(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.max().reshape((1,) * x.dim()) if keepdims else x.max()
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def min(self, x, axis=None, keepdims=False):
        if axis is None:
            return x.min().reshape((1,) * x.dim()) if keepdims else x.min()
        return torch.amin(x, dim=axis, keepdim=keepdims)

    def argmax(self, x, axis):
        return torch.argmax(x, dim=axis)

    def cumsum(self, x, axis):
        return torch.cumsum(x, dim=axis, dtype=x.dtype if x.dtype.is_floating_point else None).to(x.dtype)

    # shape
    def shape(self, x):
        return tuple(x.shape)

    def reshape(self, x, shape):
        return torch.reshape(x, tuple(shape))

    def transpose(self, x, perm):
        return x.permute(*perm)

    def concat(self, xs, axis=0):
        return torch.cat(list(xs), dim=axis)

    def stack(self, xs, axis=0):
        return torch.stack(list(xs), dim=axis)

    def take(self, x, indices, axis):
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=x.device)
        return torch.index_select(x, axis, indices.to(x.device))

    def unstack(self, x):
        return list(torch.unbind(x, 0))

    def flip(self, x, axis):
        return torch.flip(x, dims=(axis,))

    # linear algebra
    def matmul(self, a, b):
        return torch.matmul(a, b)

    def _svd(self, x):
        return torch.linalg.svd(x, full_matrices=False)

    def qr(self, x):
        return torch.linalg.qr(x, mode="reduced")

    def eigh(self, x):
        return torch.linalg.eigh(x)

    # ordering
    def sort_descending(self, x):
        return torch.sort(x, descending=True).values

    def kth_largest(self, x, k):
        # the k-th largest is the (n-k+1)-th smallest: avoids a full sort
        return torch.kthvalue(x, x.numel() - k + 1).values

    # gradients
    def value_and_grad(self, loss_fn: Callable, params: Dict[str, torch.Tensor]):
        names = list(params)
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out = {}
        for n, g in zip(names, grads):
            out[n] = torch.zeros_like(params[n]) if g is None else g.detach()
        return float(loss.detach()), out

    def hessian_vector_product(self, loss_fn: Callable, params: Dict[str, torch.Tensor], vector):
        names = list(params)
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
            dot = sum((g * vector[n].detach()).sum() for n, g in zip(names, grads) if g is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                return {n: torch.zeros_like(params[n]) for n in names}
            hv = torch.autograd.grad(dot, [params[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(params[n]) if h is None else h.detach() for n, h in zip(names, hv)}
