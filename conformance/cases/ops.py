"""Cases ``ops/*``: every operation of the neutral op contract against NumPy."""
from __future__ import annotations

from typing import List

import numpy as np

from ..fixtures import rng
from .base import Case, Outputs, Tol


CLOSE = Tol("close", atol=1e-5, rtol=1e-5)
LINALG = Tol("close", atol=1e-4, rtol=1e-4)


def _exact(*keys: str):
    """Bitwise tolerances for outputs that involve no rounding (selection, comparisons, copies)."""
    return {k: Tol("exact") for k in keys}


def _inputs():
    r = rng(1)
    a = r.standard_normal((4, 6)).astype(np.float32)
    b = r.standard_normal((4, 6)).astype(np.float32)
    ties = r.integers(-2, 3, (5, 7)).astype(np.float32)
    return a, b, ties


def _ops_elementwise(backend) -> Outputs:
    ops = backend.Ops()
    a, b, ties = _inputs()
    ta, tb, tt = ops.asarray(a), ops.asarray(b), ops.asarray(ties)
    n = ops.to_numpy
    special = ops.asarray(np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32))
    return {
        "abs": n(ops.abs(ta)), "sqrt": n(ops.sqrt(ops.abs(ta))), "exp": n(ops.exp(ta)),
        "log": n(ops.log(ops.abs(ta) + 0.1)), "sigmoid": n(ops.sigmoid(ta)), "sign": n(ops.sign(tt)),
        "square": n(ops.square(ta)), "maximum": n(ops.maximum(ta, tb)), "minimum": n(ops.minimum(ta, tb)),
        "clip": n(ops.clip(ta, -0.5, 0.5)), "where": n(ops.where(ops.greater(ta, tb), ta, tb)),
        "isfinite": n(ops.isfinite(special)), "add_mul": n(ta * tb + ta - tb / (ops.abs(tb) + 1.0)),
        "greater": n(ops.greater(tt, ops.zeros_like(tt))), "greater_equal": n(ops.greater_equal(tt, ops.zeros_like(tt))),
        "less_equal": n(ops.less_equal(tt, ops.zeros_like(tt))), "equal": n(ops.equal(tt, ops.ones_like(tt))),
        "logic": n(ops.logical_or(ops.logical_and(ops.greater(tt, ops.zeros_like(tt)), ops.less_equal(tt, ops.ones_like(tt))),
                                  ops.logical_not(ops.greater_equal(tt, ops.zeros_like(tt))))),
        "cast": n(ops.cast(ops.greater(ta, tb), "float32")),
    }


def _ref_elementwise() -> Outputs:
    a, b, ties = _inputs()
    special = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    return {
        "abs": np.abs(a), "sqrt": np.sqrt(np.abs(a)), "exp": np.exp(a), "log": np.log(np.abs(a) + 0.1),
        "sigmoid": 1 / (1 + np.exp(-a)), "sign": np.sign(ties), "square": a * a, "maximum": np.maximum(a, b),
        "minimum": np.minimum(a, b), "clip": np.clip(a, -0.5, 0.5), "where": np.where(a > b, a, b),
        "isfinite": np.isfinite(special), "add_mul": a * b + a - b / (np.abs(b) + 1.0),
        "greater": ties > 0, "greater_equal": ties >= 0, "less_equal": ties <= 0, "equal": ties == 1,
        "logic": ((ties > 0) & (ties <= 1)) | ~(ties >= 0), "cast": (a > b).astype(np.float32),
    }


def _ops_reductions(backend) -> Outputs:
    ops = backend.Ops()
    a, _, ties = _inputs()
    ta, tt = ops.asarray(a), ops.asarray(ties)
    n = ops.to_numpy
    return {
        "sum_all": n(ops.sum(ta)), "sum_axis": n(ops.sum(ta, axis=1)), "sum_keep": n(ops.sum(ta, axis=0, keepdims=True)),
        "mean": n(ops.mean(ta, axis=1)), "max": n(ops.max(ta, axis=0)), "min": n(ops.min(ta)),
        "argmax_ties": n(ops.argmax(tt, axis=1)), "argmax_ties_axis0": n(ops.argmax(tt, axis=0)),
        "cumsum": n(ops.cumsum(ta, axis=1)), "cumsum_int": n(ops.cumsum(ops.cast(tt, "int32"), axis=0)),
        "norm": n(ops.norm(ta)), "norm_axis": n(ops.norm(ta, axis=1)),
        "count_nonzero": np.array(ops.count_nonzero(tt)),
        "sort_desc": n(ops.sort_descending(ops.flatten(tt))),
        "kth_largest": np.array([ops.item(ops.kth_largest(ops.flatten(tt), k)) for k in (1, 5, 17, 35)]),
    }


def _ref_reductions() -> Outputs:
    a, _, ties = _inputs()
    flat = np.sort(ties.reshape(-1))[::-1]
    return {
        "sum_all": a.sum(), "sum_axis": a.sum(1), "sum_keep": a.sum(0, keepdims=True), "mean": a.mean(1),
        "max": a.max(0), "min": a.min(), "argmax_ties": ties.argmax(1), "argmax_ties_axis0": ties.argmax(0),
        "cumsum": np.cumsum(a, 1), "cumsum_int": np.cumsum(ties.astype(np.int32), 0), "norm": np.linalg.norm(a),
        "norm_axis": np.linalg.norm(a, axis=1), "count_nonzero": np.array(np.count_nonzero(ties)),
        "sort_desc": flat, "kth_largest": flat[[0, 4, 16, 34]],
    }


def _ops_shapes(backend) -> Outputs:
    ops = backend.Ops()
    a, b, _ = _inputs()
    ta, tb = ops.asarray(a), ops.asarray(b)
    n = ops.to_numpy
    x4 = ops.asarray(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5))
    pieces = ops.split(ops.flatten(ta), [5, 11, 8])
    return {
        "reshape": n(ops.reshape(ta, (6, 4))), "transpose": n(ops.transpose(x4, (1, 0, 3, 2))),
        "concat": n(ops.concat([ta, tb], axis=1)), "stack": n(ops.stack([ta, tb], axis=0)),
        "take": n(ops.take(x4, [2, 0], axis=1)), "split_1": n(pieces[1]), "split_2": n(pieces[2]),
        "flip": n(ops.flip(x4, 2)), "head": n(ops.head(x4, 3)), "unstack_1": n(ops.unstack(x4)[1]),
        "shape": np.array(ops.shape(x4)), "size": np.array(ops.size(x4)),
        "matmul": n(ops.matmul(ta, ops.swap_last(tb))), "batched_matmul": n(ops.matmul(x4, ops.swap_last(x4))),
    }


def _ref_shapes() -> Outputs:
    a, b, _ = _inputs()
    x4 = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = a.reshape(-1)
    return {
        "reshape": a.reshape(6, 4), "transpose": x4.transpose(1, 0, 3, 2), "concat": np.concatenate([a, b], 1),
        "stack": np.stack([a, b]), "take": x4[:, [2, 0]], "split_1": flat[5:16], "split_2": flat[16:24],
        "flip": x4[:, :, ::-1], "head": x4[..., :3], "unstack_1": x4[1],
        "shape": np.array(x4.shape), "size": np.array(x4.size), "matmul": a @ b.T,
        "batched_matmul": x4 @ np.swapaxes(x4, -1, -2),
    }


def _svd_matrices():
    r = rng(2)
    return {
        "tall": r.standard_normal((12, 5)), "wide": r.standard_normal((5, 12)),
        "conv_view": r.standard_normal((16, 27)),
        "rank_deficient": r.standard_normal((10, 2)) @ r.standard_normal((2, 8)),
        "batched": r.standard_normal((3, 6, 4)),
    }


def _ops_linalg(backend) -> Outputs:
    ops = backend.Ops()
    n = ops.to_numpy
    out = {}
    for name, m in _svd_matrices().items():
        x = ops.asarray(m.astype(np.float32))
        u, s, vh = ops.svd(x)
        un = n(u)
        k = un.shape[-1]
        idx = np.abs(un).argmax(-2)
        picked = np.take_along_axis(un, idx[..., None, :], -2)
        out[f"svd_S/{name}"] = n(s)
        out[f"svd_reconstruction/{name}"] = n(ops.matmul(u * ops.reshape(s, ops.shape(s)[:-1] + (1, k)), vh))
        out[f"svd_UtU/{name}"] = n(ops.matmul(ops.swap_last(u), u))
        out[f"svd_sign_rule/{name}"] = np.asarray(picked >= 0)
        full_rank = np.min(m.shape[-2:]) if name != "rank_deficient" else 2
        out[f"svd_U_topk/{name}"] = un[..., :full_rank]
    r = rng(3)
    q_in = r.standard_normal((9, 4)).astype(np.float32)
    q, rr = ops.qr(ops.asarray(q_in))
    out["qr_reconstruction"] = n(ops.matmul(q, rr))
    out["qr_QtQ"] = n(ops.matmul(ops.swap_last(q), q))
    sym = r.standard_normal((6, 6)).astype(np.float32)
    sym = sym @ sym.T
    w, v = ops.eigh(ops.asarray(sym))
    out["eigh_values"] = n(w)
    out["eigh_reconstruction"] = n(ops.matmul(v * ops.reshape(w, (1, 6)), ops.swap_last(v)))
    return out


def _ref_linalg() -> Outputs:
    out = {}
    for name, m in _svd_matrices().items():
        m32 = m.astype(np.float32).astype(np.float64)
        u, s, vh = np.linalg.svd(m32, full_matrices=False)
        idx = np.abs(u).argmax(-2)
        signs = np.where(np.take_along_axis(u, idx[..., None, :], -2) >= 0, 1.0, -1.0)
        u = u * signs
        k = s.shape[-1]
        full_rank = np.min(m.shape[-2:]) if name != "rank_deficient" else 2
        out[f"svd_S/{name}"] = s
        out[f"svd_reconstruction/{name}"] = m32
        out[f"svd_UtU/{name}"] = np.broadcast_to(np.eye(k), u.shape[:-2] + (k, k))
        out[f"svd_sign_rule/{name}"] = np.ones(u.shape[:-2] + (1, k), bool)
        out[f"svd_U_topk/{name}"] = u[..., :full_rank]
    r = rng(3)
    q_in = r.standard_normal((9, 4)).astype(np.float32)
    out["qr_reconstruction"] = q_in
    out["qr_QtQ"] = np.eye(4)
    sym = r.standard_normal((6, 6)).astype(np.float32)
    sym = sym @ sym.T
    out["eigh_values"] = np.linalg.eigvalsh(sym.astype(np.float64))
    out["eigh_reconstruction"] = sym
    return out


def _ops_creation(backend) -> Outputs:
    ops = backend.Ops()
    n = ops.to_numpy
    like = ops.asarray(np.ones(3, np.float32))
    normal = n(ops.random_normal((2000,), seed=5, like=like))
    uniform = n(ops.random_uniform((2000,), seed=5, like=like))
    again = n(ops.random_normal((2000,), seed=5, like=like))
    return {
        "zeros": n(ops.zeros((2, 3))), "ones": n(ops.ones((3,), dtype="int32")), "arange": n(ops.arange(5)),
        "asarray_roundtrip": n(ops.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
        "random_normal_moments": np.array([normal.mean(), normal.std()]),
        "random_uniform_range": np.array([uniform.min() >= 0.0, uniform.max() < 1.0]),
        "random_seeded_repeatable": np.array(np.array_equal(normal, again)),
        "stop_gradient": n(ops.stop_gradient(like)),
    }


def _ref_creation() -> Outputs:
    return {
        "zeros": np.zeros((2, 3)), "ones": np.ones(3, np.int32), "arange": np.arange(5),
        "asarray_roundtrip": np.arange(6, dtype=np.float32).reshape(2, 3),
        "random_normal_moments": np.array([0.0, 1.0]), "random_uniform_range": np.array([True, True]),
        "random_seeded_repeatable": np.array(True), "stop_gradient": np.ones(3, np.float32),
    }


def _grad_inputs():
    r = rng(4)
    return (r.standard_normal((3, 5)).astype(np.float32), r.standard_normal((5, 4)).astype(np.float32),
            r.standard_normal((3, 4)).astype(np.float32))


def _ops_gradients(backend) -> Outputs:
    ops = backend.Ops()
    w, x, t = _grad_inputs()
    pw, pb = ops.parameter(w, "w"), ops.parameter(np.zeros((3, 1), np.float32), "b")
    tx, tt = ops.asarray(x), ops.asarray(t)

    def loss():
        d = ops.matmul(pw, tx) + pb - tt
        return ops.sum(d * d)

    value, grads = ops.value_and_grad(loss, {"w": pw, "b": pb})
    return {"loss": np.array(value), "grad_w": ops.to_numpy(grads["w"]), "grad_b": ops.to_numpy(grads["b"])}


def _ref_gradients() -> Outputs:
    w, x, t = _grad_inputs()
    d = w @ x - t
    return {"loss": np.array((d * d).sum()), "grad_w": 2 * d @ x.T, "grad_b": 2 * d.sum(1, keepdims=True)}


def cases() -> List[Case]:
    return [
        Case("ops/creation", "ops", _ops_creation, _ref_creation,
             {"random_normal_moments": Tol("close", atol=0.1),
              **_exact("zeros", "ones", "arange", "asarray_roundtrip", "random_uniform_range",
                       "random_seeded_repeatable", "stop_gradient")}, CLOSE),
        Case("ops/elementwise", "ops", _ops_elementwise, _ref_elementwise,
             _exact("abs", "sign", "square", "maximum", "minimum", "clip", "where", "isfinite", "greater",
                    "greater_equal", "less_equal", "equal", "logic", "cast"), CLOSE),
        Case("ops/reductions", "ops", _ops_reductions, _ref_reductions,
             _exact("max", "min", "argmax_ties", "argmax_ties_axis0", "cumsum_int", "count_nonzero", "sort_desc",
                    "kth_largest"), CLOSE),
        Case("ops/shapes", "ops", _ops_shapes, _ref_shapes,
             _exact("reshape", "transpose", "concat", "stack", "take", "split_1", "split_2", "flip", "head",
                    "unstack_1", "shape", "size"), CLOSE),
        Case("ops/linalg", "ops", _ops_linalg, _ref_linalg, {"svd_sign_rule": Tol("exact")}, LINALG),
        Case("ops/gradients", "ops", _ops_gradients, _ref_gradients, {}, LINALG),
    ]
