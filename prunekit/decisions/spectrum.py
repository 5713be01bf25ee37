"""Rank machinery shared by RPG and TRP: matrix views of conv weights and fast top spectra.

Both algorithms need, every step, the leading singular subspace of every conv weight's
matrix view (RPG: the best rank-k approximation; TRP: the rank-r truncation and U_r V_rᵀ).
A full SVD per layer per step is far too slow, so :class:`SpectrumEngine` offers three
methods that compute the *same quantities* to within a stated tolerance:

``exact``
    batched SVD of same-shape layers (one call per distinct shape).
``gram``
    the Gram matrix G = M Mᵀ of the smaller side (a matmul) and its eigen-decomposition:
    σ_i² = eigenvalues, U = eigenvectors. Cheap when min(m, n) is small (CIFAR nets: ≤ 64×64,
    i.e. 1 % of the cost of the SVD of the 64×576 matrix).
``subspace``
    one warm-started block power iteration per step on the previous step's basis Q
    (Q ← orth(G Q)), then Rayleigh–Ritz on the q×q matrix QᵀGQ. q = (rank needed) +
    ``oversample``; an exact solve is made every ``refresh_every`` steps, on the first call,
    whenever the rank asked for does not fit inside q, and after :meth:`SpectrumEngine.reset`
    (callers reset when the weights jump, e.g. at a mask update). Matmuls and a thin QR only:
    the method of choice on GPUs, where eigh/SVD kernels are slow.

The ``nd`` scheme (network decoupling, TRP's release ``--type ND``) takes the spectrum of every
*filter* instead: W[o] as a (C_in, kh·kw) matrix; :func:`nd_projection` is its TRP step and
:func:`nd_factors` its decomposition into parallel pointwise + depthwise paths.

All methods return, per layer, the leading left singular vectors ``U`` (m × q), the leading
singular values ``S`` (q) and the total energy ‖M‖_F² — enough to choose ranks by energy
(``energy_rank``) or residual energy (``residual_rank``) and to project onto the subspace:
the best rank-k approximation is U_k U_kᵀ M (Eckart–Young).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from prunekit.contract.ops import Ops, Tensor
from prunekit.errors import ConfigError

SCHEMES = ("channel", "spatial", "nd")
METHODS = ("auto", "exact", "gram", "subspace", "tracked")  # auto, tracked: prunekit.decisions.spectrum_tracking


def matrix_view(ops: Ops, w: Tensor, scheme: str = "channel") -> Tensor:
    """The matrix a rank is taken of.

    ``channel`` (TRP's NC, RPG's view): (C_out, C_in·kh·kw).
    ``spatial`` (TRP's VH): W permuted to (C_in, kh, C_out, kw) → (C_in·kh, C_out·kw).
    (``nd`` has one matrix per filter: :func:`nd_view`.)
    """
    shape = ops.shape(w)
    if scheme == "channel" or len(shape) == 2:
        return ops.reshape(w, (shape[0], -1))
    if scheme == "spatial":
        co, ci, kh, kw = shape
        return ops.reshape(ops.transpose(w, (1, 2, 0, 3)), (ci * kh, co * kw))
    raise ConfigError(f"unknown decomposition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def from_matrix_view(ops: Ops, m: Tensor, shape: Sequence[int], scheme: str = "channel") -> Tensor:
    """Inverse of :func:`matrix_view`."""
    shape = tuple(shape)
    if scheme == "channel" or len(shape) == 2:
        return ops.reshape(m, shape)
    co, ci, kh, kw = shape
    return ops.transpose(ops.reshape(m, (ci, kh, co, kw)), (2, 0, 1, 3))


@dataclass
class Spectrum:
    """Leading spectrum of one matrix M (m × n) on its smaller side.

    ``basis`` holds the leading singular vectors of that side, columns in descending σ order:
    left vectors U (m × q) when ``side == "left"`` (m ≤ n), right vectors V (n × q) otherwise.
    """

    basis: Tensor
    s: np.ndarray        # (q,) singular values, descending (host copy, float64)
    total_energy: float  # ‖M‖_F²
    exact: bool          # True if q covers the whole spectrum (S is complete)
    side: str = "left"

    def energies(self) -> np.ndarray:
        """σ_i² for the known values, then the unexplained remainder as one lump (if any)."""
        e = self.s.astype(np.float64) ** 2
        if not self.exact:
            e = np.concatenate([e, [max(0.0, self.total_energy - e.sum())]])
        return e


@dataclass
class SpectrumGroup:
    """The spectra of same-shape matrices, kept stacked: the batched form of :class:`Spectrum`."""

    names: Tuple[str, ...]
    stack: Tensor            # (B, m, n): the matrices as given, in ``names`` order
    basis: Tensor            # (B, a, q): leading singular vectors of the smaller side, σ descending
    s: np.ndarray            # (B, q) singular values (host, float64)
    total_energy: np.ndarray  # (B,) ‖M‖_F² (host, float64)
    exact: bool
    side: str = "left"

    def weighted_projection(self, ops: Ops, x: Tensor, coef: np.ndarray) -> Tensor:
        """Per matrix b of the stack ``x`` (B, m, n): B_b diag(coef[b]) B_bᵀ X_b on the left side,
        X_b B_b diag(coef[b]) B_bᵀ on the right. ``coef`` (B, q) on the host: ones on the first k
        columns give the best rank-k approximation (Eckart–Young); 1/σ there gives U_k V_kᵀ."""
        b, q = ops.shape(self.basis)[0], ops.shape(self.basis)[-1]
        c = ops.asarray(np.asarray(coef, dtype=np.float32), like=x)
        if self.side == "left":
            return ops.matmul(self.basis, ops.matmul(ops.swap_last(self.basis), x) * ops.reshape(c, (b, q, 1)))
        return ops.matmul(ops.matmul(x, self.basis) * ops.reshape(c, (b, 1, q)), ops.swap_last(self.basis))


class SpectrumEngine:
    """Leading spectra of many matrices, batched by shape, with the method chosen above."""

    def __init__(self, ops: Ops, method: str = "gram", refresh_every: int = 50, oversample: int = 4):
        if method not in METHODS:
            raise ConfigError(f"unknown spectrum method {method!r}; expected one of {', '.join(METHODS)}")
        if method in ("auto", "tracked"):  # resolved by prunekit.decisions.spectrum_tracking.resolve_spectrum; tracked uses its BasisTracker
            method = "gram"
        if refresh_every < 1 or oversample < 0:
            raise ConfigError("refresh_every must be >= 1 and oversample >= 0")
        self.ops = ops
        self.method = method
        self.refresh_every = int(refresh_every)
        self.oversample = int(oversample)
        self._basis: Dict[Tuple, Tensor] = {}  # shape key -> (B, m', q) warm-start basis
        self._calls = 0
        self.exact_solves = 0

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Forget the warm-start bases, so the next call solves exactly. Call it when the matrices
        jump (e.g. a mask update): one warm-started iteration only tracks slow drift."""
        self._basis.clear()

    def state_dict(self) -> dict:
        """The warm-start bases and the call counter (which decides the refresh steps), as NumPy."""
        return {"calls": int(self._calls), "exact_solves": int(self.exact_solves),
                "bases": [{"shape": list(key[0]), "names": list(key[1]), "basis": np.asarray(self.ops.to_numpy(b))}
                          for key, b in self._basis.items()]}

    def load_state_dict(self, state: dict, like: Tensor | None = None) -> None:
        """Restore :meth:`state_dict`'s output (bases placed beside ``like`` when given)."""
        self._calls = int(state.get("calls", 0))
        self.exact_solves = int(state.get("exact_solves", 0))
        self._basis = {(tuple(int(d) for d in b["shape"]), tuple(b["names"])):
                       self.ops.asarray(np.asarray(b["basis"]), dtype=np.asarray(b["basis"]).dtype.name, like=like)
                       for b in state.get("bases", [])}

    def spectra(self, mats: Dict[str, Tensor], need: Dict[str, int] | None = None) -> Dict[str, Spectrum]:
        """Spectra of named matrices. ``need[name]`` is the number of leading values the caller
        expects to use (the subspace method keeps that many plus ``oversample``)."""
        out: Dict[str, Spectrum] = {}
        for g in self.group_spectra(mats, need):
            for i, (n, basis) in enumerate(zip(g.names, self.ops.unstack(g.basis))):
                out[n] = Spectrum(basis, g.s[i], float(g.total_energy[i]), g.exact, g.side)
        return out

    def group_spectra(self, mats: Dict[str, Tensor], need: Dict[str, int] | None = None) -> List["SpectrumGroup"]:
        """The same spectra, one :class:`SpectrumGroup` per distinct shape (layers stay stacked,
        for callers that work on whole groups: a handful of batched ops instead of a few per layer)."""
        ops = self.ops
        need = need or {}
        groups: Dict[Tuple[int, ...], List[str]] = {}
        for name, m in mats.items():
            groups.setdefault(tuple(ops.shape(m)), []).append(name)
        out: List[SpectrumGroup] = []
        refresh = self._calls % self.refresh_every == 0
        self._calls += 1
        for shape, names in groups.items():
            given = stack = ops.stack([mats[n] for n in names], axis=0)  # (B, m, n)
            transposed = shape[0] > shape[1]
            if transposed:  # work on the smaller side: left vectors of Mᵀ are right vectors of M
                stack = ops.swap_last(stack)
            key = (shape, tuple(names))
            want = max([need.get(n, 0) for n in names] + [1])
            if self.method == "exact":
                u_all, s_all, exact = self._exact_svd(stack)
            elif self.method == "subspace" and not refresh and self._basis_fits(key, stack, want):
                u_all, s_all, exact = self._subspace(stack, key)
            else:  # gram; or subspace needing an exact solve (first call, refresh, basis too small)
                u_all, s_all, exact = self._gram(stack)
                if self.method == "subspace":
                    self._store_basis(key, u_all, want)
            energy = ops.sum(stack * stack, axis=(1, 2))
            s_host = ops.to_numpy(s_all).astype(np.float64)
            e_host = ops.to_numpy(energy).astype(np.float64)
            side = "right" if transposed else "left"
            out.append(SpectrumGroup(tuple(names), given, u_all, s_host, e_host, exact, side))
        return out

    # ------------------------------------------------------------------ methods
    def _exact_svd(self, stack):
        self.exact_solves += 1
        u, s, _ = self.ops.svd(stack)
        return u, s, True

    def _descending_eigh(self, g):
        """(σ, vectors) of symmetric PSD matrices g = M Mᵀ, σ descending."""
        ops = self.ops
        w, v = ops.eigh(g)  # ascending
        w, v = ops.flip(w, 1), ops.flip(v, 2)
        return ops.sqrt(ops.clip(w, 0.0, None)), v

    def _gram(self, stack):
        self.exact_solves += 1
        s, v = self._descending_eigh(self.ops.matmul(stack, self.ops.swap_last(stack)))  # G: (B, m, m)
        return v, s, True

    def _basis_fits(self, key, stack, want: int) -> bool:
        """A stored warm-start basis that holds the rank now needed (plus one)."""
        ops = self.ops
        return key in self._basis and ops.shape(self._basis[key])[-1] >= min(ops.shape(stack)[-2], want + 1)

    def _store_basis(self, key, u_all, want: int) -> None:
        ops = self.ops
        m = ops.shape(u_all)[-2]
        q = min(m, want + self.oversample)
        self._basis[key] = ops.head(u_all, q)

    def _subspace(self, stack, key):
        ops = self.ops
        g = ops.matmul(stack, ops.swap_last(stack))
        q, _ = ops.qr(ops.matmul(g, self._basis[key]))  # one block power step from the stored basis
        s, v = self._descending_eigh(ops.matmul(ops.swap_last(q), ops.matmul(g, q)))  # Rayleigh-Ritz, (B, q, q)
        u = ops.matmul(q, v)
        self._basis[key] = u
        return u, s, ops.shape(s)[-1] >= ops.shape(stack)[-2]


def project_top(ops: Ops, m: Tensor, spec: Spectrum, k: int) -> Tensor:
    """Best rank-k approximation of M (Eckart–Young): U_k U_kᵀ M, or M V_k V_kᵀ."""
    if k <= 0:
        return ops.zeros_like(m)
    bk = ops.head(spec.basis, k)
    if spec.side == "left":
        return ops.matmul(bk, ops.matmul(ops.swap_last(bk), m))
    return ops.matmul(ops.matmul(m, bk), ops.swap_last(bk))


def top_factors(ops: Ops, m: Tensor, spec: Spectrum, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(U_r, S_r, Vh_r) of M from its spectrum: the missing side is M's product with the known
    one divided by σ (only call with σ_r > 0, e.g. ranks chosen by energy)."""
    br = ops.head(spec.basis, r)
    s = ops.asarray(spec.s[:r].astype(np.float32), like=m)
    inv = ops.asarray((1.0 / np.maximum(spec.s[:r], 1e-30)).astype(np.float32), like=m)
    if spec.side == "left":
        vh = ops.matmul(ops.swap_last(br), m) * ops.reshape(inv, (r, 1))
        return br, s, vh
    u = ops.matmul(m, br) * ops.reshape(inv, (1, r))
    return u, s, ops.swap_last(br)


def rank_ops(ops: Ops, where: str = "auto") -> Ops:
    """The ops the rank machinery runs on: the backend's (``"device"``), NumPy's (``"host"``),
    or the backend's preference (``"auto"``, its ``prefers_host_linalg`` attribute)."""
    if where == "host" or (where == "auto" and getattr(ops, "prefers_host_linalg", False)):
        from prunekit.contract.numpy_ops import NumpyOps
        return NumpyOps()
    return ops


def to_rank_ops(algorithm, x: Tensor) -> Tensor:
    """A backend tensor in the algorithm's rank ops (a host copy when those are NumPy's)."""
    return x if algorithm.rank_ops is algorithm.ops else algorithm.ops.to_numpy(x)


def from_rank_ops(algorithm, x, layer: str) -> Tensor:
    """A rank-ops result back as a backend tensor beside the layer's weight."""
    if algorithm.rank_ops is algorithm.ops:
        return x
    return algorithm.ops.asarray(np.asarray(x, dtype=np.float32), like=algorithm.handle.weight(layer))


# ------------------------------------------------------------------------------ network decoupling
def nd_view(ops: Ops, w: Tensor) -> Tensor:
    """The ``nd`` scheme's matrices of a conv weight (C_out, C_in, kh, kw): one (C_in, kh·kw)
    matrix per filter, stacked as (C_out, C_in, kh·kw)."""
    co, ci, kh, kw = ops.shape(w)
    return ops.reshape(w, (co, ci, kh * kw))


def filter_spectra(ops: Ops, stack: Tensor) -> SpectrumGroup:
    """Exact spectra of a stack of per-filter matrices (B, C_in, kh·kw) from the Gram matrix of
    the smaller side (at most kh·kw: 9×9 for a 3×3 conv), names the filter positions."""
    b, m, n = ops.shape(stack)
    transposed = m > n
    work = ops.swap_last(stack) if transposed else stack
    w, v = ops.eigh(ops.matmul(work, ops.swap_last(work)))  # ascending
    s = ops.sqrt(ops.clip(ops.flip(w, 1), 0.0, None))
    energy = ops.sum(stack * stack, axis=(1, 2))
    return SpectrumGroup(tuple(range(b)), stack, ops.flip(v, 2), ops.to_numpy(s).astype(np.float64),
                         ops.to_numpy(energy).astype(np.float64), True, "right" if transposed else "left")


def nd_layer_rank(filter_ranks: Sequence[int], shape: Sequence[int]) -> int:
    """The rank of an ND decomposition: the largest per-filter rank, at most min(C_in, kh·kw)
    (the release's ``min(max(valid_idx), min(C_in, kh·kw))``); every filter gets that many paths."""
    _, ci, kh, kw = shape
    return int(min(max(list(filter_ranks) + [0]), ci, kh * kw))


@dataclass
class NDStep:
    """One TRP step of the ``nd`` scheme on a set of layers (tensors in the ops given)."""

    projected: Dict[str, Tensor]   # layer -> weight with every filter truncated to its own rank
    terms: Dict[str, Tensor]       # layer -> λ·U_r V_rᵀ per filter (the nuclear-norm sub-gradient)
    ranks: Dict[str, int]          # layer -> nd_layer_rank of the per-filter ranks
    filter_ranks: Dict[str, np.ndarray]


def nd_projection(ops: Ops, weights: Dict[str, Tensor], rank_rule: Callable[[np.ndarray, float], int],
                  lam: float) -> NDStep:
    """The TRP step on the ND view (as the release's ``low_rank_approx`` with ``--type ND``): per
    filter, r = ``rank_rule(σ, ‖W[o]‖²)``; W[o] ← its rank-r truncation, and the term
    λ·U_r V_rᵀ for the gradient. Same-shape layers are handled as one stack."""
    by_shape: Dict[Tuple[int, ...], List[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(ops.shape(w)), []).append(name)
    out = NDStep({}, {}, {}, {})
    for shape, names in by_shape.items():
        co, ci, kh, kw = shape
        stack = ops.reshape(ops.stack([weights[n] for n in names], axis=0), (len(names) * co, ci, kh * kw))
        g = filter_spectra(ops, stack)
        q = g.s.shape[1]
        ranks = np.array([rank_rule(s, e) for s, e in zip(g.s, g.total_energy)], dtype=np.int64)
        keep = (np.arange(q)[None, :] < ranks[:, None]).astype(np.float64)
        inv_s = keep / np.maximum(g.s, 1e-30)
        truncated = ops.unstack(ops.reshape(g.weighted_projection(ops, stack, keep), (len(names),) + shape))
        terms = ops.unstack(ops.reshape(g.weighted_projection(ops, stack, inv_s) * lam, (len(names),) + shape)) \
            if lam > 0 else [None] * len(names)
        for i, name in enumerate(names):
            r = ranks[i * co:(i + 1) * co]
            out.filter_ranks[name] = r
            out.ranks[name] = nd_layer_rank(r, shape)
            if np.any(r < q):  # some filter is truncated (a full-rank one comes back as itself)
                out.projected[name] = truncated[i]
            if lam > 0 and np.any(r > 0):
                out.terms[name] = terms[i]
    return out


def nd_factors(weight: np.ndarray, choose: Callable[[np.ndarray], int], rank: int | None = None):
    """The ND decomposition of a conv weight (C_out, C_in, kh, kw), in float64: per filter
    W[o] = Σ_j σ_oj u_oj v_ojᵀ (u over input channels, v over the kernel window), truncated to K
    terms, K = ``rank`` or :func:`nd_layer_rank` of ``choose(σ_o)`` per filter.

    Path j of the release's decoupled layer is a pointwise conv (C_in → C_out, weights
    √σ_oj u_oj) followed by a depthwise conv (weights √σ_oj v_oj), the paths summed. Returned
    fused, as two convs computing exactly that sum: ``pointwise`` (K·C_out, C_in), row o·K + j
    path j of filter o, and ``grouped`` (C_out, K, kh, kw), a conv with C_out groups of K
    channels (group o sums filter o's K paths). Returns (K, pointwise, grouped)."""
    w = np.asarray(weight, dtype=np.float64)
    co, ci, kh, kw = w.shape
    u, s, vh = np.linalg.svd(w.reshape(co, ci, kh * kw), full_matrices=False)  # (co, ci, q), (co, q), (co, q, k)
    q = s.shape[1]
    k = int(min(max(1, int(rank)), q)) if rank is not None else max(1, nd_layer_rank([choose(x) for x in s], w.shape))
    root = np.sqrt(s[:, :k])                                                # (co, k)
    pointwise = (u[:, :, :k] * root[:, None, :]).transpose(0, 2, 1).reshape(co * k, ci)
    grouped = (vh[:, :k, :] * root[:, :, None]).reshape(co, k, kh, kw)
    return k, pointwise, grouped


def nd_truncate(weight: np.ndarray, rank: int) -> np.ndarray:
    """Every filter of a conv weight truncated to ``rank`` terms (float64): the conv an ND
    decomposition of that rank computes."""
    w = np.asarray(weight, dtype=np.float64)
    co, ci, kh, kw = w.shape
    u, s, vh = np.linalg.svd(w.reshape(co, ci, kh * kw), full_matrices=False)
    k = min(int(rank), s.shape[1])
    return np.einsum("oik,ok,okx->oix", u[:, :, :k], s[:, :k], vh[:, :k, :]).reshape(w.shape)
