"""The MindSpore backend: the Ops contract against NumPy (both SVD/QR/eigh paths), layer
discovery, the model handle, and the training drivers (functional loop, ``Model.train`` with the
callback, ``Trainer``) keeping pruned weights exactly zero with SGD+momentum+weight decay and Adam."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
import mindspore.nn as nn  # noqa: E402
import mindspore.ops as msops  # noqa: E402

from prunekit.backends.mindspore import (PruningCallback, PruningSession, PruningTrainOneStepCell, Trainer,  # noqa: E402
                                make_optimizer, model_handle)
from prunekit.backends.mindspore.driver import optimizer_state_by_layer  # noqa: E402
from prunekit.backends.mindspore.optimizers import Adam  # noqa: E402
from prunekit.backends.mindspore.layers import MindSporeModelHandle, conv_padding, discover_layers  # noqa: E402
from prunekit.backends.mindspore.models import build_model  # noqa: E402
from prunekit.backends.mindspore.ops import MindSporeOps, check_device  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.errors import ConfigError, ModelError, PlanError  # noqa: E402
from prunekit.contract.reference_models import MODELS  # noqa: E402

OPS = MindSporeOps()
HOST = MindSporeOps(svd="host", qr="host", eigh="host")


def T(a, dtype="float32"):
    return OPS.asarray(np.asarray(a), dtype)


def N(x):
    return OPS.to_numpy(x)


# ====================================================================== Ops contract vs NumPy
def test_creation_and_conversion():
    a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    for dt, npdt in [("float32", np.float32), ("float64", np.float64), ("int32", np.int32), ("int64", np.int64),
                     ("bool", np.bool_)]:
        t = OPS.asarray(a, dt)
        assert OPS.dtype(t) == dt
        np.testing.assert_array_equal(N(t), a.astype(npdt))
        assert OPS.dtype(OPS.zeros((2,), dt)) == dt and OPS.dtype(OPS.ones((2,), dt)) == dt
    assert OPS.dtype(OPS.asarray(T(a), "float64")) == "float64"       # from a tensor: a cast
    t = T(a)
    back = N(t)
    back[0, 0] = 99.0                       # to_numpy is a copy
    assert N(t)[0, 0] == np.float32(a[0, 0])
    assert OPS.asarray(3.5).shape == ()
    assert OPS.shape(OPS.asarray([1, 2, 3], like=t)) == (3,)
    np.testing.assert_array_equal(N(OPS.zeros((2, 3))), np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(N(OPS.ones((4,), "int32")), np.ones(4, np.int32))
    np.testing.assert_array_equal(N(OPS.arange(5)), np.arange(5))
    assert OPS.dtype(OPS.arange(5)) == "int64" and OPS.dtype(OPS.arange(3, "int32")) == "int32"
    z = OPS.zeros_like(T(a))
    o = OPS.ones_like(OPS.asarray(a, "float64"))
    assert OPS.shape(z) == (3, 4) and OPS.dtype(z) == "float32" and N(z).sum() == 0
    assert OPS.dtype(o) == "float64" and N(o).sum() == 12
    np.testing.assert_array_equal(N(OPS.cast(T([1.7, -2.2, 0.0]), "int64")), [1, -2, 0])
    assert OPS.dtype(OPS.cast(T([1.0]), "float64")) == "float64"
    assert OPS.item(T([[2.5]])) == 2.5 and isinstance(OPS.item(T(2.5)), float)
    p = OPS.parameter(a, "p")
    assert isinstance(p, ms.Parameter) and p.requires_grad and p.name == "p" and OPS.dtype(p) == "float32"
    sg = ms.grad(lambda x: (OPS.stop_gradient(x * 2) * x).sum())(T([1.0, 2.0]))
    np.testing.assert_array_equal(N(sg), [2.0, 4.0])                  # only the non-stopped factor


def test_random_generators_seeded():
    ms.set_seed(1)
    a = N(OPS.random_normal((20000,), seed=3))
    ms.set_seed(2)                                  # the global seed does not matter
    b = N(OPS.random_normal((20000,), seed=3))
    c = N(OPS.random_normal((20000,), seed=4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05 and a.dtype == np.float32
    u = N(OPS.random_uniform((4, 5000), seed=9))
    np.testing.assert_array_equal(u, N(OPS.random_uniform((4, 5000), seed=9)))
    assert u.shape == (4, 5000) and u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_elementwise_and_logic():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    y = rng.standard_normal((4, 5)).astype(np.float32)
    x[0, 0], y[0, 0] = 0.5, 0.5      # an exact equality
    x[1, 1] = 0.0
    pos = np.abs(x) + 0.1
    close = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(N(OPS.abs(T(x))), np.abs(x), **close)
    np.testing.assert_allclose(N(OPS.sqrt(T(pos))), np.sqrt(pos), **close)
    np.testing.assert_allclose(N(OPS.exp(T(x))), np.exp(x), rtol=1e-5)   # MindSpore CPU exp: ~3e-6
    np.testing.assert_allclose(N(OPS.log(T(pos))), np.log(pos), **close)
    np.testing.assert_allclose(N(OPS.sigmoid(T(x))), 1 / (1 + np.exp(-x.astype(np.float64))), **close)
    np.testing.assert_array_equal(N(OPS.sign(T(x))), np.sign(x))
    np.testing.assert_array_equal(N(OPS.square(T(x))), x * x)
    np.testing.assert_array_equal(N(OPS.maximum(T(x), T(y))), np.maximum(x, y))
    np.testing.assert_array_equal(N(OPS.minimum(T(x), T(y))), np.minimum(x, y))
    np.testing.assert_array_equal(N(OPS.clip(T(x), -0.5, 0.5)), np.clip(x, -0.5, 0.5))
    np.testing.assert_array_equal(N(OPS.clip(T(x), None, 0.2)), np.minimum(x, 0.2))
    np.testing.assert_array_equal(N(OPS.clip(T(x), -0.2, None)), np.maximum(x, -0.2))
    np.testing.assert_array_equal(N(OPS.where(OPS.greater(T(x), T(y)), T(x), T(y))), np.where(x > y, x, y))
    bad = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    np.testing.assert_array_equal(N(OPS.isfinite(T(bad))), np.isfinite(bad))
    np.testing.assert_array_equal(N(OPS.greater(T(x), T(y))), x > y)
    np.testing.assert_array_equal(N(OPS.greater_equal(T(x), T(y))), x >= y)
    np.testing.assert_array_equal(N(OPS.less_equal(T(x), T(y))), x <= y)
    np.testing.assert_array_equal(N(OPS.equal(T(x), T(y))), x == y)
    a, b = x > 0, y > 0
    np.testing.assert_array_equal(N(OPS.logical_and(T(a, "bool"), T(b, "bool"))), a & b)
    np.testing.assert_array_equal(N(OPS.logical_or(T(a, "bool"), T(b, "bool"))), a | b)
    np.testing.assert_array_equal(N(OPS.logical_not(T(a, "bool"))), ~a)
    # operators and broadcasting follow NumPy
    np.testing.assert_array_equal(N(T(x) * T(y[:1])), x * y[:1])
    np.testing.assert_array_equal(N(T(x) + T(y[:, :1]) - T(x[:1, :1])), x + y[:, :1] - x[:1, :1])
    np.testing.assert_allclose(N(T(x) / T(pos)), x / pos, rtol=1e-6)
    np.testing.assert_array_equal(N(-T(x)), -x)
    np.testing.assert_array_equal(N(OPS.greater(T(x), T(np.float32(0.1)))), x > np.float32(0.1))
    np.testing.assert_array_equal(N(OPS.equal(OPS.reshape(OPS.arange(3), (3, 1)), OPS.asarray([[0, 2]], "int64"))),
                                  np.arange(3)[:, None] == np.array([[0, 2]]))


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(axis, keepdims):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    for op, ref in [(OPS.sum, np.sum), (OPS.mean, np.mean)]:
        got = N(op(T(x), axis=axis, keepdims=keepdims))
        want = ref(x.astype(np.float64), axis=axis, keepdims=keepdims)
        assert got.shape == np.shape(want), (op.__name__, axis, keepdims)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_norm = N(OPS.norm(T(x), axis=axis, keepdims=keepdims))
    want_norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axis, keepdims=keepdims))
    assert got_norm.shape == np.shape(want_norm)
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-5)
    if not isinstance(axis, tuple):   # max / min take one axis or None
        for op, ref in [(OPS.max, np.max), (OPS.min, np.min)]:
            got = N(op(T(x), axis=axis, keepdims=keepdims))
            want = ref(x, axis=axis, keepdims=keepdims)
            assert got.shape == np.shape(want), (op.__name__, axis, keepdims)
            np.testing.assert_array_equal(got, want)


def test_argmax_first_on_ties_cumsum_count_nonzero():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -7.0]], np.float32)
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=1)), np.argmax(x, axis=1))   # first on ties
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=0)), np.argmax(x, axis=0))
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=-1)), [1, 0, 0])
    assert OPS.dtype(OPS.argmax(T(x), axis=0)) == "int64"
    rng = np.random.default_rng(2)
    ties = rng.integers(0, 3, size=(5, 40, 6)).astype(np.float32)   # many ties along every axis
    for axis in (0, 1, 2, -2):
        np.testing.assert_array_equal(N(OPS.argmax(T(ties), axis)), np.argmax(ties, axis), err_msg=str(axis))
    nan = np.array([[1.0, np.nan, 3.0, np.nan], [0.0, 5.0, 5.0, 1.0]], np.float32)
    np.testing.assert_array_equal(N(OPS.argmax(T(nan), 1)), np.argmax(nan, 1))        # NaN counts as max
    y = rng.standard_normal((4, 6)).astype(np.float32)
    for axis in (0, 1, -1):
        c = OPS.cumsum(T(y), axis)
        assert OPS.dtype(c) == "float32"
        np.testing.assert_allclose(N(c), np.cumsum(y.astype(np.float64), axis), rtol=1e-5, atol=1e-6)
    ints = rng.integers(0, 3, size=50).astype(np.int32)
    c = OPS.cumsum(T(ints, "int32"), 0)
    assert OPS.dtype(c) == "int32"
    np.testing.assert_array_equal(N(c), np.cumsum(ints))
    z = rng.standard_normal((7, 9)).astype(np.float32)
    z[z < 0.3] = 0.0
    assert OPS.count_nonzero(T(z)) == np.count_nonzero(z)


def test_shape_ops_take_and_split():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert OPS.shape(T(x)) == (2, 3, 4) and OPS.size(T(x)) == 24
    np.testing.assert_array_equal(N(OPS.reshape(T(x), (4, -1))), x.reshape(4, -1))
    np.testing.assert_array_equal(N(OPS.flatten(T(x))), x.reshape(-1))
    np.testing.assert_array_equal(N(OPS.transpose(T(x), (2, 0, 1))), np.transpose(x, (2, 0, 1)))
    np.testing.assert_array_equal(N(OPS.swap_last(T(x))), np.swapaxes(x, -1, -2))
    np.testing.assert_array_equal(N(OPS.concat([T(x), T(x[:1])], axis=0)), np.concatenate([x, x[:1]], 0))
    np.testing.assert_array_equal(N(OPS.concat([T(x), T(x)], axis=-1)), np.concatenate([x, x], -1))
    np.testing.assert_array_equal(N(OPS.stack([T(x), T(x * 2)], axis=1)), np.stack([x, x * 2], 1))
    for axis, idx in [(0, [1, 0, 1]), (1, [2]), (2, [3, 0]), (-1, [1, 1, 2]), (1, np.array([0, 2]))]:
        np.testing.assert_array_equal(N(OPS.take(T(x), idx, axis)), np.take(x, idx, axis))
    np.testing.assert_array_equal(N(OPS.take(T(x), OPS.asarray([2, 0], "int64"), 1)), np.take(x, [2, 0], 1))
    np.testing.assert_array_equal(N(OPS.take(T(x), OPS.asarray([3], "int32"), 2)), np.take(x, [3], 2))
    v = np.arange(10, dtype=np.float32)
    pieces = OPS.split(T(v), [3, 0, 5, 2])            # x[a:b] slicing, an empty piece included
    assert [OPS.shape(p) for p in pieces] == [(3,), (0,), (5,), (2,)]
    for got, want in zip(pieces, np.split(v, [3, 3, 8])):
        np.testing.assert_array_equal(N(got), want)


def test_matmul_batched():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(N(OPS.matmul(T(a), T(b))), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def ref_svd(x):
    """NumPy economy SVD with the documented sign rule applied (largest-|.| entry of U's columns > 0)."""
    u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    idx = np.argmax(np.abs(u), axis=-2)                           # first on ties
    picked = np.take_along_axis(u, idx[..., None, :], axis=-2)    # (..., 1, k)
    signs = np.where(picked >= 0, 1.0, -1.0)
    return u * signs, s, vh * np.swapaxes(signs, -1, -2)


@pytest.mark.parametrize("ops", [OPS, HOST], ids=["device", "host"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 4), (2, 3, 4, 9), (1, 1)])
def test_svd_convention(ops, shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    u, s, vh = (ops.to_numpy(t) for t in ops.svd(ops.asarray(x)))
    k = min(shape[-2:])
    assert u.shape == shape[:-1] + (k,) and s.shape == shape[:-2] + (k,) and vh.shape == shape[:-2] + (k, shape[-1])
    assert u.dtype == s.dtype == vh.dtype == np.float32
    assert np.all(np.diff(s, axis=-1) <= 0)                      # descending
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, x, atol=1e-5)   # (S, U, V) reordered, V transposed
    idx = np.argmax(np.abs(u), axis=-2)                          # sign rule on the returned U
    assert np.all(np.take_along_axis(u, idx[..., None, :], axis=-2) > 0)
    ru, rs, rvh = ref_svd(x)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, ru, atol=1e-4)
    np.testing.assert_allclose(vh, rvh, atol=1e-4)


def test_svd_modes_agree_and_sign_rule_with_ties():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    d = [OPS.to_numpy(t) for t in OPS.svd(T(x))]
    h = [HOST.to_numpy(t) for t in HOST.svd(T(x))]
    for a, b in zip(d, h):
        np.testing.assert_allclose(a, b, atol=1e-5)
    u1, _, vh1 = d
    u2, _, vh2 = (N(t) for t in OPS.svd(T(-x)))                  # -x = U S (-Vh): U fixed, Vh flips
    np.testing.assert_allclose(u1, u2, atol=1e-5)
    np.testing.assert_allclose(vh1, -vh2, atol=1e-5)
    # columns of U with two entries of equal largest magnitude: the first one decides the sign
    q = np.array([[1, 1], [-1, 1], [0, 0]], np.float64) / np.sqrt(2)
    y = (q @ np.diag([3.0, 1.0]) @ np.eye(2)).astype(np.float32)
    for ops in (OPS, HOST):
        u = ops.to_numpy(ops.svd(ops.asarray(y))[0])
        assert u[0, 0] > 0 and u[0, 1] > 0                       # row 0 is the first maximum in both columns


def test_linalg_modes_from_environment(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_MS_SVD", "host")
    monkeypatch.setenv("PRUNEKIT_MS_QR", "HOST")
    monkeypatch.setenv("PRUNEKIT_MS_EIGH", "device")
    o = MindSporeOps()
    assert (o.svd_mode, o.qr_mode, o.eigh_mode) == ("host", "host", "device")
    assert MindSporeOps(svd="device").svd_mode == "device"       # an argument beats the variable
    monkeypatch.setenv("PRUNEKIT_MS_SVD", "gpu")
    with pytest.raises(ConfigError, match="PRUNEKIT|svd"):
        MindSporeOps()
    monkeypatch.delenv("PRUNEKIT_MS_SVD")
    with pytest.raises(ConfigError, match="qr"):
        MindSporeOps(qr="cloud")
    assert MindSporeOps(qr="device").eigh_mode == "device" and MindSporeOps(eigh=None, qr="device").qr_mode == "device"


@pytest.mark.parametrize("ops", [OPS, HOST, MindSporeOps(eigh="device")], ids=["default", "host", "device"])
def test_qr_and_eigh(ops):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    q, r = (ops.to_numpy(t) for t in ops.qr(ops.asarray(x)))
    assert q.shape == (3, 6, 4) and r.shape == (3, 4, 4)
    np.testing.assert_allclose(q @ r, x, atol=1e-5)
    np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)
    np.testing.assert_array_equal(np.tril(r, -1), 0)
    a = rng.standard_normal((2, 5, 5))
    sym = (a + np.swapaxes(a, -1, -2)).astype(np.float32)
    for mat in (sym, sym[0]):                                    # batched and single
        w, v = (ops.to_numpy(t) for t in ops.eigh(ops.asarray(mat)))
        assert w.shape == mat.shape[:-1] and v.shape == mat.shape
        np.testing.assert_allclose(w, np.linalg.eigvalsh(mat.astype(np.float64)), atol=1e-4)
        assert np.all(np.diff(w, axis=-1) >= 0)                  # ascending
        np.testing.assert_allclose(mat @ v, v * w[..., None, :], atol=1e-4)   # eigenvectors in columns


def test_sort_descending_and_kth_largest():
    rng = np.random.default_rng(8)
    x = rng.integers(-3, 4, size=200).astype(np.float32)
    np.testing.assert_array_equal(N(OPS.sort_descending(T(x))), np.sort(x)[::-1])
    ref = np.sort(x)[::-1]
    for k in (1, 2, 57, 100, 101, 199, 200):
        got = OPS.kth_largest(T(x), k)
        assert OPS.shape(got) == ()
        assert OPS.item(got) == ref[k - 1], k
    for n in (1, 2, 33):
        y = rng.standard_normal(n).astype(np.float32)
        for k in range(1, n + 1):
            assert OPS.item(OPS.kth_largest(T(y), k)) == np.sort(y)[::-1][k - 1], (n, k)


def test_value_and_grad_matches_analytic():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    w0 = rng.standard_normal(3).astype(np.float32)
    v0 = rng.standard_normal((2, 2)).astype(np.float32)
    params = {"w": OPS.parameter(w0, "w"), "v": OPS.parameter(v0, "v"), "unused": OPS.parameter(np.ones(5), "unused")}
    At, bt = T(A), T(b)

    def loss_fn():
        r = OPS.matmul(At, params["w"]) - bt
        return OPS.sum(r * r) + OPS.sum(params["v"] * params["v"] * params["v"])

    loss, grads = OPS.value_and_grad(loss_fn, params)
    r = A.astype(np.float64) @ w0 - b
    assert isinstance(loss, float)
    assert loss == pytest.approx(float(r @ r + (v0.astype(np.float64) ** 3).sum()), rel=1e-5)
    assert set(grads) == set(params)
    np.testing.assert_allclose(N(grads["w"]), 2 * A.T.astype(np.float64) @ r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(N(grads["v"]), 3 * v0.astype(np.float64) ** 2, rtol=1e-5)
    np.testing.assert_array_equal(N(grads["unused"]), np.zeros(5))
    np.testing.assert_array_equal(N(params["w"]), w0)           # parameters untouched


def test_svd_sign_fix_runs_on_device_tensors_only():
    """fix_svd_signs (core) on MindSpore: argmax, arange, reshape, broadcast equal, cast, sum, where."""
    from prunekit.contract.ops import fix_svd_signs
    rng = np.random.default_rng(10)
    u = rng.standard_normal((2, 4, 3)).astype(np.float32)
    vh = rng.standard_normal((2, 3, 5)).astype(np.float32)
    fu, _, fvh = fix_svd_signs(OPS, T(u), T(np.ones((2, 3), np.float32)), T(vh))
    signs = np.where(np.take_along_axis(u, np.argmax(np.abs(u), -2)[:, None, :], -2) >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(N(fu), u * signs)
    np.testing.assert_array_equal(N(fvh), vh * np.swapaxes(signs, -1, -2))


# ====================================================================== models and discovery
EXPECTED_COUNTS = {"resnet20": (19, 1), "resnet32": (31, 1), "resnet56": (55, 1), "vgg16": (13, 1), "vgg19": (16, 1),
                   "mobilenetv2": (57, 1), "mnist_cnn": (2, 2)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_discovery_of_reference_models(name):
    in_ch, size = (1, 28) if name == "mnist_cnn" else (3, 32)
    model = build_model(name, 10, in_ch)
    layers = discover_layers(model, (in_ch, size, size))
    cells = dict(model.cells_and_names())
    order = [n for n, c in model.cells_and_names() if isinstance(c, (nn.Conv2d, nn.Dense))]
    assert [l.name for l in layers] == order
    assert (sum(l.kind == "conv" for l in layers), sum(l.kind == "linear" for l in layers)) == EXPECTED_COUNTS[name]
    for l in layers:
        c = cells[l.name]
        assert l.weight_shape == tuple(c.weight.shape) and l.has_bias == c.has_bias
        if l.kind == "conv":
            assert (l.in_channels, l.out_channels, l.groups) == (c.in_channels, c.out_channels, c.group)
            assert l.padding == ((l.kernel_size[0] - 1) // 2,) * 2
    depthwise = [l for l in layers if l.is_depthwise]
    assert len(depthwise) == (17 if name == "mobilenetv2" else 0)
    assert all(l.weight_shape[1] == 1 and l.groups == l.out_channels for l in depthwise)
    # no hook is left behind by the probe
    assert all(not getattr(c, "_forward_hook", None) for c in cells.values())


def test_resnet20_spatial_sizes():
    h = model_handle("resnet20", seed=0)
    res = {1: 32, 2: 16, 3: 8}
    for l in h.layers:
        if l.name == "conv1":
            assert (l.input_hw, l.output_hw) == ((32, 32), (32, 32))
        elif l.name == "fc":
            assert l.kind == "linear" and l.output_hw == (1, 1) and l.macs_per_weight == 1
        else:
            stage, block, conv = l.name.split(".")
            s = int(stage[-1])
            out = res[s]
            inp = res[s - 1] if (s > 1 and block == "0" and conv == "conv1") else out
            assert (l.input_hw, l.output_hw) == ((inp, inp), (out, out)), l.name
            assert l.stride == ((2, 2) if inp != out else (1, 1))


def test_shared_parameter_names_and_empty_shortcuts():
    h = model_handle("mobilenetv2", seed=0)
    names = set(h.state_numpy())
    assert {"layers.1.shortcut.0.weight", "layers.1.shortcut.1.running_var", "bn1.weight", "bn1.bias",
            "layers.0.bn1.running_mean", "fc.bias"} <= names
    assert not any("gamma" in n or "beta" in n or "moving" in n for n in names)
    assert not any(n.startswith(("layers.2.shortcut", "layers.3.shortcut")) for n in names)   # empty shortcuts
    params = h.parameters_by_name()
    assert "bn1.weight" in params and not any(n.endswith(("running_mean", "running_var")) for n in params)
    assert all(isinstance(p, ms.Parameter) for p in params.values())
    assert model_handle("vgg16").state_shapes()["features.1.weight"] == ((64,), True)


def test_conv_padding_modes():
    def conv(**kw):
        return nn.Conv2d(4, 4, 3, **kw)
    assert conv_padding("c", conv(pad_mode="pad", padding=2)) == (2, 2)
    assert conv_padding("c", conv(pad_mode="pad", padding=(1, 1, 2, 2))) == (1, 2)
    assert conv_padding("c", conv(pad_mode="valid")) == (0, 0)
    assert conv_padding("c", conv()) == (1, 1)                             # MindSpore's default "same"
    with pytest.raises(ModelError, match="'c'"):
        conv_padding("c", conv(pad_mode="pad", padding=(0, 1, 0, 1)))
    with pytest.raises(ModelError, match="same"):
        conv_padding("c", conv(stride=2))


def test_model_without_prunable_layer_and_device_check():
    with pytest.raises(ModelError, match="prunable"):
        MindSporeModelHandle(nn.SequentialCell([nn.ReLU()]), (3, 8, 8), "relu_only")
    check_device(None)
    check_device("cpu")
    check_device("CPU")
    with pytest.raises(ConfigError, match="GPU"):
        check_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device"):
        model_handle("mnist_cnn", 10, 1, 28, device="tpu")


def test_nan_weight_refused_by_bind_without_change():
    for bad in (float("nan"), float("inf")):
        h = model_handle("mnist_cnn", 10, 1, 28, seed=1)
        w = h.weights_numpy()["conv2"]
        w[3, 2, 1, 0] = bad
        h.set_weight("conv2", T(w))
        before = h.state_numpy()
        alg = make_algorithm("magnitude", sparsity=0.5, schedule="oneshot")
        with pytest.raises(ModelError, match="conv2"):
            alg.bind(h, total_steps=10)
        after = h.state_numpy()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        assert alg.masks == {}


def test_weight_writes_are_in_place():
    h = model_handle("mnist_cnn", 10, 1, 28, seed=0)
    p = h.module("fc2").weight
    w = h.weights_numpy()["fc2"]
    mask = (np.arange(w.size).reshape(w.shape) % 3 != 0).astype(np.float32)
    h.mul_weight_("fc2", T(mask))
    assert h.module("fc2").weight is p                                    # same Parameter object
    np.testing.assert_array_equal(N(p), w * mask)
    h.set_weight("fc2", T(np.full(w.shape, 0.25, np.float32)))
    assert np.all(N(h.weight("fc2")) == 0.25) and h.module("fc2").weight is p


# ====================================================================== handle state
def test_state_numpy_round_trip_and_strict_errors():
    a = model_handle("resnet20", seed=0)
    b = model_handle("resnet20", seed=1)
    sa = a.state_numpy()
    sa["bn1.running_mean"] = np.linspace(-1, 1, 16).astype(np.float32)   # BN statistics travel too
    sa["bn1.running_var"] = np.linspace(0.5, 2, 16).astype(np.float32)
    b.load_state_numpy(sa)
    sb = b.state_numpy()
    for k in sa:
        np.testing.assert_array_equal(sb[k], sa[k], err_msg=k)
    a.load_state_numpy(sa)
    x = T(np.random.default_rng(0).standard_normal((2, 3, 32, 32)))
    a.model.set_train(False), b.model.set_train(False)
    np.testing.assert_array_equal(N(a.model(x)), N(b.model(x)))

    c = model_handle("resnet20", seed=2)
    before = c.state_numpy()
    missing = dict(sa)
    del missing["layer1.0.conv1.weight"]
    with pytest.raises(PlanError, match="layer1.0.conv1.weight"):
        c.load_state_numpy(missing)
    with pytest.raises(PlanError, match="bogus"):
        c.load_state_numpy({**sa, "bogus.weight": np.zeros(1, np.float32)})
    wrong = dict(sa)
    wrong["fc.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(PlanError, match="fc.weight"):
        c.load_state_numpy(wrong)
    with pytest.raises(PlanError, match="fc.weight"):
        c.load_state_numpy({"fc.bias": np.ones(10, np.float32), "fc.weight": np.zeros((100, 64), np.float32)},
                           strict=False)
    after = c.state_numpy()
    for k in before:                                  # failed loads changed nothing
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    c.load_state_numpy({"fc.bias": np.full(10, 0.5, np.float32)}, strict=False)   # partial load
    assert np.all(c.state_numpy()["fc.bias"] == 0.5)
    np.testing.assert_array_equal(c.state_numpy()["conv1.weight"], before["conv1.weight"])


def test_initialize_is_seeded_and_framework_rng_independent():
    ms.set_seed(123)
    a = model_handle("resnet20", seed=7).state_numpy()
    ms.set_seed(456)
    b = model_handle("resnet20", seed=7).state_numpy()
    c = model_handle("resnet20", seed=8).state_numpy()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    weights = [k for k in a if k.endswith(".weight") and a[k].ndim >= 2]
    assert len(weights) == 20 and all(not np.array_equal(a[k], c[k]) for k in weights)
    for k in a:
        if ".bn" in k or k.startswith("bn"):
            leaf = k.rsplit(".", 1)[1]
            np.testing.assert_array_equal(a[k], np.ones_like(a[k]) if leaf in ("weight", "running_var") else 0)


# ====================================================================== training drivers
class TinyCNN(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, pad_mode="pad", padding=1, has_bias=True)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.9)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, pad_mode="pad", padding=1, has_bias=True)
        self.fc = nn.Dense(16 * 6 * 6, 10)

    def construct(self, x):
        x = msops.relu(self.bn1(self.conv1(x)))
        x = msops.relu(self.conv2(x))
        return self.fc(msops.flatten(x))


def tiny_handle(seed=0):
    h = MindSporeModelHandle(TinyCNN(), (1, 12, 12), "tiny")
    h.initialize(seed)
    return h


def random_batches(n, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32))
            for _ in range(n)]


def _pruned(alg):
    return {n: N(m) == 0 for n, m in alg.masks.items()}


def _nonzero_at(handle, pruned):
    w = handle.weights_numpy()
    return sum(int(np.count_nonzero(w[n][where])) for n, where in pruned.items())


def _state_at_pruned(optimizer, handle, pruned):
    """Largest sum of |value| of the optimizer's state tensors at pruned positions."""
    state = optimizer_state_by_layer(optimizer, {l.name: handle.module(l.name).weight for l in handle.layers})
    worst = 0.0
    for name, where in pruned.items():
        for v in state.get(name, ()):
            worst = max(worst, float(np.abs(N(v)[where]).sum()))
    return worst


def test_make_optimizer_semantics_and_errors():
    h = tiny_handle()
    sgd = make_optimizer(h.model, "SGD", lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert isinstance(sgd, nn.SGD) and float(sgd.momentum.asnumpy()) == pytest.approx(0.9)
    assert all(sgd.decay_flags) and len(sgd.decay_flags) == len(sgd.parameters)   # BN gamma/beta decay too
    adam = make_optimizer(h.model, "adam", lr=1e-3, weight_decay=1e-4)
    assert isinstance(adam, Adam) and len(adam.moment1) == len(adam.parameters)
    state = optimizer_state_by_layer(sgd, {l.name: h.module(l.name).weight for l in h.layers})
    assert sorted(state) == sorted(l.name for l in h.layers) and all(len(v) == 1 for v in state.values())
    state = optimizer_state_by_layer(adam, {l.name: h.module(l.name).weight for l in h.layers})
    assert all(sorted(p.name.split(".")[0] for p in v) == ["moment1", "moment2"] for v in state.values())
    momentum = nn.Momentum(h.model.trainable_params(), 0.1, 0.9)            # a user's own optimizer
    state = optimizer_state_by_layer(momentum, {l.name: h.module(l.name).weight for l in h.layers})
    assert all([p.name.split(".")[0] for p in v] == ["moments"] for v in state.values()) and len(state) == 3
    for bad in ("rmsprop", "", "sgdd"):
        with pytest.raises(ConfigError, match="optimizer"):
            make_optimizer(h.model, bad)
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(h, None, optimizer="lamb")


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_functional_loop_keeps_pruned_weights_exactly_zero(optimizer, lr):
    """1,000 steps of MindSpore's own value_and_grad loop around a PruningSession; masks grow
    during the first 600 steps, so the optimizer state is masked on every change."""
    steps = 1000
    h = tiny_handle(1)
    net = h.model
    opt = make_optimizer(net, optimizer, lr=lr, momentum=0.9, weight_decay=5e-4)
    alg = make_algorithm("magnitude", sparsity=0.8, schedule="cubic", frequency=50, end_fraction=0.6)
    session = PruningSession(h, alg, opt, total_steps=steps)

    def forward(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.jit(ms.value_and_grad(forward, None, opt.parameters))
    data = [tuple(ms.Tensor(a) for a in b) for b in random_batches(16, seed=1)]
    net.set_train(True)
    start = h.weights_numpy()
    violations, state_leaks, changes, prev = 0, 0.0, 0, None
    for t in range(steps):
        session.before_step()
        loss, grads = grad_fn(*data[t % len(data)])
        grads = session.transform_gradients(grads)
        assert session.should_step()
        opt(grads)
        pruned = _pruned(alg)
        violations += _nonzero_at(h, pruned)       # zero already before the re-masking
        session.after_optimizer_step()
        key = tuple(int(w.sum()) for w in pruned.values())
        if key != prev:
            changes += 1
            state_leaks = max(state_leaks, _state_at_pruned(opt, h, pruned))
            prev = key
    session.finish()
    pruned = _pruned(alg)
    assert changes >= 10                                   # the masks really changed
    assert violations == 0 and state_leaks == 0.0
    assert _state_at_pruned(opt, h, pruned) == 0.0
    assert session.step == steps
    total = sum(l.numel for l in h.layers)
    assert sum(int(w.sum()) for w in pruned.values()) == total - int(np.floor(total * 0.2 + 0.5))
    end = h.weights_numpy()
    assert max(float(np.abs(end[n] - start[n])[~w].max()) for n, w in pruned.items()) > 1e-3   # kept ones trained
    assert np.isfinite(float(loss.asnumpy()))
    state = session.state_dict()
    assert state["step"] == steps and sorted(state["algorithm"]["masks"]) == sorted(l.name for l in h.layers)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_trainer_keeps_pruned_weights_exactly_zero(optimizer, lr):
    steps = 120
    h = tiny_handle(2)
    alg = make_algorithm("magnitude", sparsity=0.75, schedule="cubic", frequency=10, end_fraction=0.5)
    trainer = Trainer(h, alg, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=5e-4, total_steps=steps,
                      lr_schedule="cosine")
    data = random_batches(8, seed=2)
    violations, leaks = 0, 0.0
    for t in range(steps):
        loss = trainer.train_step(*data[t % len(data)])
        pruned = _pruned(alg)
        violations += _nonzero_at(h, pruned)
        if t % 10 == 0:
            leaks = max(leaks, _state_at_pruned(trainer.optimizer, h, pruned))
    trainer.finish()
    assert violations == 0 and leaks == 0.0
    assert float(trainer.optimizer.learning_rate.asnumpy()) == pytest.approx(trainer.lr.lr_at(steps - 1), rel=1e-5)
    assert np.isfinite(float(loss))
    loss_val, acc = trainer.evaluate(data[:3])
    assert np.isfinite(loss_val) and 0.0 <= acc <= 1.0
    assert trainer.model.training is False
    trainer.train_step(*data[0])                           # back to training after evaluate
    assert trainer.model.training is True


def test_model_train_with_callback():
    """``mindspore.train.Model.train`` (PyNative, no sink) with PruningTrainOneStepCell + PruningCallback."""
    from mindspore.dataset import NumpySlicesDataset
    from mindspore.train import Model

    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 48).astype(np.int32)
    dataset = NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(8)       # 6 steps per epoch
    h = tiny_handle(3)
    opt = make_optimizer(h.model, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs, steps = 3, 18
    alg = make_algorithm("magnitude", sparsity=0.7, schedule="cubic", frequency=4, end_fraction=0.7)
    session = PruningSession(h, alg, opt, total_steps=steps)
    loss_net = nn.WithLossCell(h.model, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))

    seen = []

    class Spy(ms.train.Callback):
        def on_train_step_end(self, run_context):
            pruned = _pruned(alg)
            seen.append((_nonzero_at(h, pruned), _state_at_pruned(opt, h, pruned)))

    start = h.weights_numpy()
    Model(PruningTrainOneStepCell(loss_net, opt, session)).train(
        epochs, dataset, callbacks=[PruningCallback(session), Spy()], dataset_sink_mode=False)
    assert session.step == steps and len(seen) == steps
    assert all(v == 0 and s == 0.0 for v, s in seen)
    pruned = _pruned(alg)
    total = sum(l.numel for l in h.layers)
    assert sum(int(w.sum()) for w in pruned.values()) == total - int(np.floor(total * 0.3 + 0.5))   # finish()
    end = h.weights_numpy()
    assert max(float(np.abs(end[n] - start[n])[~w].max()) for n, w in pruned.items()) > 1e-3


def test_trainer_without_algorithm_and_step_skipping():
    h = tiny_handle(4)
    data = random_batches(2, seed=4)
    trainer = Trainer(h, None, "sgd", 0.05, 0.9, 0.0, total_steps=5, lr_schedule="constant", jit=False)
    before = h.state_numpy()
    trainer.train_step(*data[0])
    after = h.state_numpy()
    assert any(not np.array_equal(before[k], after[k]) for k in before)

    class Skipper(type(make_algorithm("magnitude", sparsity=0.5))):
        def should_step_optimizer(self, step):
            return step % 2 == 1

    h = tiny_handle(5)
    alg = Skipper(sparsity=0.5, schedule="oneshot")
    trainer = Trainer(h, alg, "sgd", 0.05, 0.9, 0.0, total_steps=4, lr_schedule="constant")
    trainer.train_step(*data[0])                                  # step 0: masks set, no update
    w0 = h.weights_numpy()
    trainer.train_step(*data[1])                                  # step 1: update
    w1 = h.weights_numpy()
    assert any(not np.array_equal(w0[n], w1[n]) for n in w0)
    assert trainer.session.step == 2
