"""The backend-neutral tensor API that every prunekit algorithm is written against.

An algorithm receives an :class:`Ops` instance and the tensors of one framework; it never
imports that framework. Each backend (``backends/torch/ops.py``, ``backends/mindspore/ops.py``)
subclasses :class:`Ops` and implements the abstract primitives. A handful of operations that
carry a *convention* (SVD signs, the top-k tie rule) are implemented here, once, on top of the
primitives, so that every backend follows the same rule by construction.

Conventions
-----------
* Tensors are float32 unless a dtype is named; dtypes are the strings ``"float32"``,
  ``"float64"``, ``"int32"``, ``"int64"``, ``"bool"``.
* ``svd(x)`` returns ``(U, S, Vh)``: economy size, ``S`` descending, batched over leading axes,
  ``x ≈ U @ diag(S) @ Vh``. Signs are fixed by :func:`Ops.svd`'s rule: in each left singular
  vector the entry of largest magnitude (first one on ties) is positive; the matching row of
  ``Vh`` is flipped with it.
* Operators ``+ - * /`` and unary ``-`` on tensors are the framework's own; both frameworks
  broadcast as NumPy does.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

Tensor = Any  # a framework tensor; the neutral core treats it as opaque


class Ops(abc.ABC):
    """Abstract tensor operations; one subclass per framework."""

    #: backend name, e.g. "torch" or "mindspore"
    name: str = "abstract"

    def on_accelerator(self, x: Tensor) -> bool:
        """Whether ``x`` lives on an accelerator (GPU, NPU): choices such as RPG/TRP's
        ``spectrum="auto"`` follow it. NumPy and CPU tensors: False."""
        return False

    # ------------------------------------------------------------------ creation / conversion
    @abc.abstractmethod
    def asarray(self, data, dtype: str = "float32", like: Tensor | None = None) -> Tensor:
        """A tensor from a NumPy array or Python scalar/list, on ``like``'s device if given."""

    @abc.abstractmethod
    def to_numpy(self, x: Tensor) -> np.ndarray:
        """A NumPy copy of ``x`` (host transfer; keep out of per-step code)."""

    @abc.abstractmethod
    def zeros(self, shape: Sequence[int], dtype: str = "float32", like: Tensor | None = None) -> Tensor: ...

    @abc.abstractmethod
    def ones(self, shape: Sequence[int], dtype: str = "float32", like: Tensor | None = None) -> Tensor: ...

    @abc.abstractmethod
    def arange(self, n: int, dtype: str = "int64", like: Tensor | None = None) -> Tensor: ...

    @abc.abstractmethod
    def random_normal(self, shape: Sequence[int], seed: int, like: Tensor | None = None) -> Tensor:
        """Standard-normal samples from the framework's own generator seeded with ``seed``."""

    @abc.abstractmethod
    def random_uniform(self, shape: Sequence[int], seed: int, like: Tensor | None = None) -> Tensor:
        """Uniform [0, 1) samples from the framework's own generator seeded with ``seed``."""

    @abc.abstractmethod
    def parameter(self, data, name: str) -> Tensor:
        """A trainable parameter (``nn.Parameter`` / ``mindspore.Parameter``) from a NumPy array."""

    @abc.abstractmethod
    def cast(self, x: Tensor, dtype: str) -> Tensor: ...

    @abc.abstractmethod
    def stop_gradient(self, x: Tensor) -> Tensor: ...

    def zeros_like(self, x: Tensor) -> Tensor:
        return self.zeros(self.shape(x), dtype=self.dtype(x), like=x)

    def ones_like(self, x: Tensor) -> Tensor:
        return self.ones(self.shape(x), dtype=self.dtype(x), like=x)

    @abc.abstractmethod
    def dtype(self, x: Tensor) -> str: ...

    @abc.abstractmethod
    def item(self, x: Tensor) -> float:
        """A Python number from a one-element tensor (synchronises with the device)."""

    # ------------------------------------------------------------------ elementwise
    @abc.abstractmethod
    def abs(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def sqrt(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def exp(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def log(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def sigmoid(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def sign(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def maximum(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def minimum(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def clip(self, x: Tensor, lo: float | None, hi: float | None) -> Tensor: ...

    @abc.abstractmethod
    def where(self, cond: Tensor, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def isfinite(self, x: Tensor) -> Tensor: ...

    def square(self, x: Tensor) -> Tensor:
        return x * x

    # ------------------------------------------------------------------ comparison / logic
    @abc.abstractmethod
    def greater(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def greater_equal(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def less_equal(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def equal(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def logical_and(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def logical_or(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def logical_not(self, a: Tensor) -> Tensor: ...

    # ------------------------------------------------------------------ reductions
    @abc.abstractmethod
    def sum(self, x: Tensor, axis: int | Tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor: ...

    @abc.abstractmethod
    def mean(self, x: Tensor, axis: int | Tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor: ...

    @abc.abstractmethod
    def max(self, x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor: ...

    @abc.abstractmethod
    def min(self, x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor: ...

    @abc.abstractmethod
    def argmax(self, x: Tensor, axis: int) -> Tensor:
        """Index of the maximum along ``axis``; the first one on ties."""

    @abc.abstractmethod
    def cumsum(self, x: Tensor, axis: int) -> Tensor: ...

    def norm(self, x: Tensor, axis: int | Tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Euclidean (Frobenius) norm over ``axis`` (all axes when None)."""
        return self.sqrt(self.sum(x * x, axis=axis, keepdims=keepdims))

    def count_nonzero(self, x: Tensor) -> int:
        return int(round(self.item(self.sum(self.cast(self.logical_not(self.equal(x, self.zeros_like(x))), "float32")))))

    # ------------------------------------------------------------------ shape
    @abc.abstractmethod
    def shape(self, x: Tensor) -> Tuple[int, ...]: ...

    @abc.abstractmethod
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor: ...

    @abc.abstractmethod
    def transpose(self, x: Tensor, perm: Sequence[int]) -> Tensor: ...

    @abc.abstractmethod
    def concat(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor: ...

    @abc.abstractmethod
    def stack(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor: ...

    @abc.abstractmethod
    def take(self, x: Tensor, indices: Sequence[int] | Tensor, axis: int) -> Tensor:
        """Select ``indices`` along ``axis`` (used by compaction and channel masks)."""

    def flip(self, x: Tensor, axis: int) -> Tensor:
        """Reverse the order along ``axis``."""
        n = self.shape(x)[axis]
        return self.take(x, list(range(n - 1, -1, -1)), axis)

    def head(self, x: Tensor, k: int) -> Tensor:
        """The first ``k`` entries along the last axis (a slice, not a gather)."""
        return x[..., :k]

    def unstack(self, x: Tensor) -> List[Tensor]:
        """The slices of ``x`` along its first axis."""
        return [x[i] for i in range(self.shape(x)[0])]

    def size(self, x: Tensor) -> int:
        return int(np.prod(self.shape(x), dtype=np.int64))

    def flatten(self, x: Tensor) -> Tensor:
        return self.reshape(x, (-1,))

    def split(self, x: Tensor, sizes: Sequence[int]) -> List[Tensor]:
        """Split a 1-D tensor into consecutive pieces of the given sizes."""
        out, start = [], 0
        for n in sizes:
            out.append(x[start:start + n])
            start += n
        return out

    # ------------------------------------------------------------------ linear algebra
    @abc.abstractmethod
    def matmul(self, a: Tensor, b: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _svd(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Economy SVD ``(U, S, Vh)`` with S descending, any signs; batched over leading axes."""

    @abc.abstractmethod
    def qr(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Reduced QR, batched over leading axes."""

    @abc.abstractmethod
    def eigh(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Eigen-decomposition of symmetric matrices: eigenvalues ascending, vectors in columns."""

    def svd(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Economy SVD with the sign convention of this module (see the module docstring)."""
        u, s, vh = self._svd(x)
        return fix_svd_signs(self, u, s, vh)

    def swap_last(self, x: Tensor) -> Tensor:
        """Transpose the last two axes."""
        nd = len(self.shape(x))
        perm = list(range(nd))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.transpose(x, perm)

    # ------------------------------------------------------------------ ordering
    @abc.abstractmethod
    def sort_descending(self, x: Tensor) -> Tensor:
        """Values of a 1-D tensor sorted in descending order (values only, so ties don't matter)."""

    def kth_largest(self, x: Tensor, k: int) -> Tensor:
        """The k-th largest value (1-based) of a 1-D tensor, as a 0-d tensor."""
        return self.sort_descending(x)[k - 1]

    # ------------------------------------------------------------------ gradients
    @abc.abstractmethod
    def value_and_grad(self, loss_fn: Callable[[], Tensor], params: Dict[str, Tensor]) -> Tuple[float, Dict[str, Tensor]]:
        """Evaluate ``loss_fn()`` and its gradient with respect to each named parameter.

        ``params`` maps names to the framework's trainable parameters (``nn.Parameter`` or
        ``mindspore.Parameter``). Returns the loss as a Python float and the gradients by name.
        Parameter ``.grad`` fields / optimizer state are not touched.
        """


    def hessian_vector_product(self, loss_fn: Callable[[], Tensor], params: Dict[str, Tensor],
                               vector: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``H v`` by name, for the Hessian of ``loss_fn()`` with respect to ``params`` and a
        direction ``vector`` (a constant, same names and shapes). Second-order autograd: ReLU and
        max-pool count as locally linear (their kinks add nothing), as in every framework's double
        backward. A finite difference of gradients is no substitute on such networks: each kink a
        step crosses adds a jump of order 1/step times a crossing probability of order step, a
        bias that does not shrink with the step (measured: 40-120 % error on ResNet-20 and the
        MNIST CNN, in float64 too). Backends without reliable second-order gradients raise
        :class:`~prunekit.errors.ModelError`.
        """
        from prunekit.errors import ModelError
        raise ModelError(f"the {self.name} backend has no Hessian-vector product (second-order gradients)")


def fix_svd_signs(ops: Ops, u: Tensor, s: Tensor, vh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Make the largest-magnitude entry (first on ties) of each column of ``U`` positive.

    The sign of column ``j`` of ``U`` and of row ``j`` of ``Vh`` are flipped together, so the
    product is unchanged. Works on batched inputs (leading axes).
    """
    shape = ops.shape(u)
    m = shape[-2]
    idx = ops.argmax(ops.abs(u), axis=-2)  # (..., k)
    rows = ops.reshape(ops.arange(m, dtype="int64", like=u), (m, 1))  # (m, 1)
    idx_b = ops.reshape(idx, tuple(shape[:-2]) + (1, shape[-1]))
    onehot = ops.cast(ops.equal(rows, idx_b), ops.dtype(u))  # (..., m, k)
    picked = ops.sum(u * onehot, axis=-2, keepdims=True)  # (..., 1, k)
    one = ops.ones((1,), dtype=ops.dtype(u), like=u)
    signs = ops.where(ops.greater_equal(picked, ops.zeros((1,), dtype=ops.dtype(u), like=u)), one, -one)
    u = u * signs
    vh = vh * ops.swap_last(signs)
    return u, s, vh
