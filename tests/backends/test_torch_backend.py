"""The PyTorch backend: the Ops contract against NumPy, layer discovery, the model handle, and
the training driver keeping pruned weights exactly zero."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prunekit.backends.torch import PruningSession, Trainer, model_handle  # noqa: E402
from prunekit.backends.torch.layers import TorchModelHandle, discover_layers  # noqa: E402
from prunekit.backends.torch.models import build_model  # noqa: E402
from prunekit.backends.torch.ops import TorchOps  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.errors import ModelError, PlanError  # noqa: E402
from prunekit.contract.reference_models import MODELS  # noqa: E402

OPS = TorchOps()




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
    t = T(a)
    back = N(t)
    back[0, 0] = 99.0                       # to_numpy is a copy
    assert N(t)[0, 0] == np.float32(a[0, 0])
    assert OPS.asarray(3.5).shape == ()
    assert OPS.shape(OPS.asarray([1, 2, 3], like=t)) == (3,)
    np.testing.assert_array_equal(N(OPS.zeros((2, 3))), np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(N(OPS.ones((4,), "int32")), np.ones(4, np.int32))
    assert OPS.dtype(OPS.ones((4,), "int32")) == "int32"
    np.testing.assert_array_equal(N(OPS.arange(5)), np.arange(5))
    assert OPS.dtype(OPS.arange(5)) == "int64"
    z = OPS.zeros_like(T(a))
    o = OPS.ones_like(OPS.asarray(a, "float64"))
    assert OPS.shape(z) == (3, 4) and OPS.dtype(z) == "float32" and N(z).sum() == 0
    assert OPS.dtype(o) == "float64" and N(o).sum() == 12
    np.testing.assert_array_equal(N(OPS.cast(T([1.7, -2.2, 0.0]), "int64")), [1, -2, 0])
    assert OPS.dtype(OPS.cast(T([1.0]), "float64")) == "float64"
    assert OPS.item(T([[2.5]])) == 2.5 and isinstance(OPS.item(T(2.5)), float)
    p = torch.ones(3, requires_grad=True)
    assert not OPS.stop_gradient(p * 2).requires_grad


def test_random_generators_seeded():
    a = N(OPS.random_normal((20000,), seed=3))
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
    np.testing.assert_allclose(N(OPS.exp(T(x))), np.exp(x), rtol=1e-6)
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
    # broadcasting follows NumPy
    np.testing.assert_array_equal(N(T(x) * T(y[:1])), x * y[:1])
    np.testing.assert_array_equal(N(OPS.greater(T(x), T(np.float32(0.1)))), x > np.float32(0.1))


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


def test_argmax_cumsum_count_nonzero():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -7.0]], np.float32)
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=1)), np.argmax(x, axis=1))   # first on ties
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=0)), np.argmax(x, axis=0))
    np.testing.assert_array_equal(N(OPS.argmax(T(x), axis=-1)), [1, 0, 0])
    rng = np.random.default_rng(2)
    y = rng.standard_normal((4, 6)).astype(np.float32)
    for axis in (0, 1, -1):
        np.testing.assert_allclose(N(OPS.cumsum(T(y), axis)), np.cumsum(y.astype(np.float64), axis), rtol=1e-5, atol=1e-6)
    ints = rng.integers(0, 3, size=50).astype(np.int32)
    c = OPS.cumsum(T(ints, "int32"), 0)
    assert OPS.dtype(c) == "int32"
    np.testing.assert_array_equal(N(c), np.cumsum(ints))
    z = rng.standard_normal((7, 9)).astype(np.float32)
    z[z < 0.3] = 0.0
    assert OPS.count_nonzero(T(z)) == np.count_nonzero(z)


def test_shape_ops():
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
    for axis, idx in [(0, [1, 0, 1]), (1, [2]), (2, [3, 0]), (-1, [1, 1, 2])]:
        np.testing.assert_array_equal(N(OPS.take(T(x), idx, axis)), np.take(x, idx, axis))
    np.testing.assert_array_equal(N(OPS.take(T(x), OPS.asarray([2, 0], "int64"), 1)), np.take(x, [2, 0], 1))
    v = np.arange(10, dtype=np.float32)
    pieces = OPS.split(T(v), [3, 0, 5, 2])
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


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 4), (2, 3, 4, 9), (1, 1)])
def test_svd_convention(shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    u, s, vh = (N(t) for t in OPS.svd(T(x)))
    k = min(shape[-2:])
    assert u.shape == shape[:-1] + (k,) and s.shape == shape[:-2] + (k,) and vh.shape == shape[:-2] + (k, shape[-1])
    assert np.all(np.diff(s, axis=-1) <= 0)                      # descending
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, x, atol=1e-5)
    # sign rule on the returned U itself: the largest-magnitude entry of each column is positive
    idx = np.argmax(np.abs(u), axis=-2)
    assert np.all(np.take_along_axis(u, idx[..., None, :], axis=-2) > 0)
    ru, rs, rvh = ref_svd(x)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, ru, atol=1e-4)
    np.testing.assert_allclose(vh, rvh, atol=1e-4)


def test_svd_sign_is_deterministic_under_negation():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    u1, s1, vh1 = (N(t) for t in OPS.svd(T(x)))
    u2, s2, vh2 = (N(t) for t in OPS.svd(T(-x)))
    # -x = U diag(S) (-Vh): the sign rule fixes U, so Vh must flip
    np.testing.assert_allclose(u1, u2, atol=1e-5)
    np.testing.assert_allclose(vh1, -vh2, atol=1e-5)


def test_qr_and_eigh():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    q, r = (N(t) for t in OPS.qr(T(x)))
    assert q.shape == (3, 6, 4) and r.shape == (3, 4, 4)
    np.testing.assert_allclose(q @ r, x, atol=1e-5)
    np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)
    np.testing.assert_array_equal(np.tril(r, -1), 0)
    a = rng.standard_normal((2, 5, 5))
    sym = (a + np.swapaxes(a, -1, -2)).astype(np.float32)
    w, v = (N(t) for t in OPS.eigh(T(sym)))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(sym.astype(np.float64)), atol=1e-4)
    assert np.all(np.diff(w, axis=-1) >= 0)                      # ascending
    np.testing.assert_allclose(sym @ v, v * w[..., None, :], atol=1e-4)   # eigenvectors in columns


def test_sort_descending_and_kth_largest():
    rng = np.random.default_rng(8)
    x = rng.integers(-3, 4, size=200).astype(np.float32)
    np.testing.assert_array_equal(N(OPS.sort_descending(T(x))), np.sort(x)[::-1])
    ref = np.sort(x)[::-1]
    for k in (1, 2, 57, 100, 199, 200):
        got = OPS.kth_largest(T(x), k)
        assert OPS.shape(got) == ()
        assert OPS.item(got) == ref[k - 1], k
    y = rng.standard_normal(33).astype(np.float32)
    for k in range(1, 34):
        assert OPS.item(OPS.kth_largest(T(y), k)) == np.sort(y)[::-1][k - 1]


def test_value_and_grad_matches_analytic():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    w0 = rng.standard_normal(3).astype(np.float32)
    v0 = rng.standard_normal((2, 2)).astype(np.float32)
    params = {"w": OPS.parameter(w0, "w"), "v": OPS.parameter(v0, "v"), "unused": OPS.parameter(np.ones(5), "unused")}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    np.testing.assert_array_equal(N(params["v"]), v0)
    At, bt = torch.tensor(A), torch.tensor(b)

    def loss_fn():
        r = At @ params["w"] - bt
        return (r * r).sum() + (params["v"] ** 3).sum()

    loss, grads = OPS.value_and_grad(loss_fn, params)
    r = A.astype(np.float64) @ w0 - b
    assert isinstance(loss, float)
    assert loss == pytest.approx(float(r @ r + (v0.astype(np.float64) ** 3).sum()), rel=1e-5)
    np.testing.assert_allclose(N(grads["w"]), 2 * A.T.astype(np.float64) @ r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(N(grads["v"]), 3 * v0.astype(np.float64) ** 2, rtol=1e-5)
    np.testing.assert_array_equal(N(grads["unused"]), np.zeros(5))
    assert all(p.grad is None for p in params.values())       # .grad fields untouched


# ====================================================================== discovery
def _count_modules(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs, linears


# (conv, linear) counts from the architectures: ResNet-(6n+2) has 6n+1 convs; VGG-16/19 have 13/16;
# MobileNetV2: stem + 17 blocks x 3 + 4 projection shortcuts + final 1x1 = 57; MNIST CNN 2 + 2.
EXPECTED_COUNTS = {"resnet20": (19, 1), "resnet32": (31, 1), "resnet56": (55, 1), "vgg16": (13, 1), "vgg19": (16, 1),
                   "mobilenetv2": (57, 1), "mnist_cnn": (2, 2)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_discovery_of_reference_models(name):
    in_ch, size = (1, 28) if name == "mnist_cnn" else (3, 32)
    model = build_model(name, 10, in_ch)
    layers = discover_layers(model, (in_ch, size, size))
    convs, linears = _count_modules(model)
    assert len(layers) == len(convs) + len(linears)
    assert (sum(l.kind == "conv" for l in layers), sum(l.kind == "linear" for l in layers)) == EXPECTED_COUNTS[name]
    assert (len(convs), len(linears)) == EXPECTED_COUNTS[name]
    modules = dict(model.named_modules())
    order = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [l.name for l in layers] == order
    for l in layers:
        m = modules[l.name]
        assert l.weight_shape == tuple(m.weight.shape)
        assert l.has_bias == (m.bias is not None)
        if l.kind == "conv":
            assert isinstance(m, nn.Conv2d)
            assert (l.in_channels, l.out_channels, l.groups) == (m.in_channels, m.out_channels, m.groups)
            assert l.kernel_size == tuple(m.kernel_size) and l.stride == tuple(m.stride)
        else:
            assert isinstance(m, nn.Linear) and (l.in_channels, l.out_channels) == (m.in_features, m.out_features)
        assert l.numel == m.weight.numel()
    depthwise = [l for l in layers if l.is_depthwise]
    if name == "mobilenetv2":
        assert len(depthwise) == 17                               # one per inverted-residual block
        assert all(l.groups == l.in_channels == l.out_channels and l.weight_shape[1] == 1 for l in depthwise)
        assert all(l.name.endswith("conv2") and l.name.startswith("layers.") for l in depthwise)
        assert [l for l in layers if l.groups > 1] == depthwise
    else:
        assert depthwise == [] and all(l.groups == 1 for l in layers)


def test_resnet20_spatial_sizes():
    h = model_handle("resnet20", seed=0)
    res = {1: 32, 2: 16, 3: 8}
    for l in h.layers:
        if l.name == "conv1":
            assert (l.input_hw, l.output_hw) == ((32, 32), (32, 32))
        elif l.name == "fc":
            assert l.kind == "linear" and l.output_hw == (1, 1) and l.macs_per_weight == 1
        else:
            stage, block, conv = l.name.split(".")   # e.g. layer2.0.conv1
            s = int(stage[-1])
            out = res[s]
            inp = res[s - 1] if (s > 1 and block == "0" and conv == "conv1") else out
            assert l.input_hw == (inp, inp), l.name
            assert l.output_hw == (out, out), l.name
            assert l.stride == ((2, 2) if inp != out else (1, 1))
            assert l.macs_per_weight == out * out


def test_model_without_prunable_layer():
    with pytest.raises(ModelError, match="prunable"):
        TorchModelHandle(nn.Sequential(nn.ReLU()), (3, 8, 8), "relu_only")
    with pytest.raises(ModelError, match="bn_only"):
        TorchModelHandle(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), (3, 8, 8), "bn_only")


def test_nan_weight_refused_by_bind_without_change():
    for bad in (float("nan"), float("inf")):
        h = model_handle("resnet20", seed=1)
        with torch.no_grad():
            h.module("layer2.1.conv2").weight[3, 2, 1, 0] = bad
        before = h.state_numpy()
        alg = make_algorithm("magnitude", sparsity=0.5, schedule="oneshot")
        with pytest.raises(ModelError, match="layer2.1.conv2"):
            alg.bind(h, total_steps=10)
        after = h.state_numpy()
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        assert alg.masks == {}


# ====================================================================== handle state
def test_state_numpy_round_trip_and_strict_errors():
    a = model_handle("resnet20", seed=0)
    b = model_handle("resnet20", seed=1)
    sa = a.state_numpy()
    assert not any(k.endswith("num_batches_tracked") for k in sa)
    assert set(sa) == {k for k in a.model.state_dict() if not k.endswith("num_batches_tracked")}
    sa["bn1.running_mean"] = np.linspace(-1, 1, 16).astype(np.float32)   # buffers travel too
    b.load_state_numpy(sa)
    sb = b.state_numpy()
    for k in sa:
        np.testing.assert_array_equal(sb[k], sa[k], err_msg=k)
    a.load_state_numpy(sa)
    x = torch.randn(2, 3, 32, 32)
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))

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
        c.load_state_numpy({"fc.weight": np.zeros((100, 64), np.float32)}, strict=False)
    after = c.state_numpy()
    for k in before:                                  # failed loads changed nothing
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    c.load_state_numpy({"fc.bias": np.full(10, 0.5, np.float32)}, strict=False)   # partial load
    assert np.all(c.state_numpy()["fc.bias"] == 0.5)
    np.testing.assert_array_equal(c.state_numpy()["conv1.weight"], before["conv1.weight"])


def test_initialize_is_seeded_and_framework_rng_independent():
    torch.manual_seed(123)
    a = model_handle("resnet20", seed=7).state_numpy()
    torch.manual_seed(456)
    b = model_handle("resnet20", seed=7).state_numpy()
    c = model_handle("resnet20", seed=8).state_numpy()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    weights = [k for k in a if k.endswith(".weight") and a[k].ndim >= 2]
    assert len(weights) == 20
    assert all(not np.array_equal(a[k], c[k]) for k in weights)
    # BatchNorm: weight 1, bias 0, mean 0, var 1 (seed-independent); linear bias 0
    for k in a:
        if ".bn" in k or k.startswith("bn"):
            leaf = k.rsplit(".", 1)[1]
            np.testing.assert_array_equal(a[k], np.ones_like(a[k]) if leaf in ("weight", "running_var") else 0)
            np.testing.assert_array_equal(a[k], c[k])
    # convs: Kaiming normal with fan-out; linear: normal with std 1/sqrt(fan-in) (prunekit/contract/reference_models.py)
    w = a["layer3.1.conv1.weight"]
    assert w.std() == pytest.approx(np.sqrt(2.0 / (64 * 9)), rel=0.05) and abs(w.mean()) < 0.005
    assert a["fc.weight"].std() == pytest.approx(np.sqrt(1.0 / 64), rel=0.1)
    # different layers get different draws even with equal shapes
    assert not np.array_equal(a["layer1.0.conv1.weight"], a["layer1.0.conv2.weight"])


# ====================================================================== training driver
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def tiny_handle(seed=0):
    torch.manual_seed(seed)
    h = TorchModelHandle(TinyCNN(), (1, 12, 12), "tiny")
    h.initialize(seed)
    return h


def random_batches(n, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
            for _ in range(n)]


def _pruned_entries(alg):
    return {n: (m == 0) for n, m in alg.masks.items()}


def _state_at_pruned(optimizer, handle, pruned):
    """Sum of |value| of the optimizer-state tensors at pruned positions (largest over tensors)."""
    worst = 0.0
    for name, where in pruned.items():
        p = handle.module(name).weight
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                worst = max(worst, float(v[where].abs().sum()))
    return worst


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_trainer_keeps_pruned_weights_exactly_zero(optimizer, lr):
    steps = 1000
    h = tiny_handle()
    alg = make_algorithm("magnitude", sparsity=0.75, schedule="oneshot")
    trainer = Trainer(h, alg, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=5e-4, total_steps=steps,
                      lr_schedule="constant")
    if optimizer == "sgd":
        g = trainer.optimizer.param_groups[0]
        assert (g["momentum"], g["weight_decay"]) == (0.9, 5e-4)
    else:
        assert isinstance(trainer.optimizer, torch.optim.Adam)
    data = random_batches(16)
    trainer.train_step(*data[0])
    pruned = _pruned_entries(alg)
    masks_after_first = {n: m.clone() for n, m in alg.masks.items()}
    start = {n: h.weight(n).clone() for n in pruned}
    total = sum(int(w.numel()) for w in pruned.values())
    assert sum(int(w.sum()) for w in pruned.values()) == total - round(total * 0.25)
    violations = 0
    for t in range(1, steps):
        trainer.train_step(*data[t % len(data)])
        violations += sum(int(torch.count_nonzero(h.weight(n)[w])) for n, w in pruned.items())
    trainer.finish()
    assert violations == 0
    assert trainer.session.step == steps
    for n, m in alg.masks.items():                              # the mask was set once, at the start
        assert torch.equal(m, masks_after_first[n])
    assert _state_at_pruned(trainer.optimizer, h, pruned) == 0.0   # momentum / moments stay zero too
    moved = max(float((h.weight(n) - start[n])[~w].abs().max()) for n, w in pruned.items())
    assert moved > 1e-3                                          # the kept weights did train


def test_mask_changes_clear_optimizer_state():
    """Masks that grow during training: momentum of newly pruned weights must be cleared."""
    steps = 200
    h = tiny_handle(1)
    alg = make_algorithm("magnitude", sparsity=0.9, schedule="cubic", frequency=10, end_fraction=0.8)
    trainer = Trainer(h, alg, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, total_steps=steps,
                      lr_schedule="constant")
    data = random_batches(8, seed=1)
    changes, worst_state, violations = 0, 0.0, 0
    prev = None
    for t in range(steps):
        trainer.train_step(*data[t % len(data)])
        pruned = _pruned_entries(alg)
        key = tuple(int(w.sum()) for w in pruned.values())
        changes += key != prev
        prev = key
        violations += sum(int(torch.count_nonzero(h.weight(n)[w])) for n, w in pruned.items())
        worst_state = max(worst_state, _state_at_pruned(trainer.optimizer, h, pruned))
    assert changes >= 10          # the masks really changed during training
    assert violations == 0 and worst_state == 0.0


def test_pruning_session_in_a_plain_loop():
    steps = 120
    h = tiny_handle(2)
    model = h.model
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    alg = make_algorithm("magnitude", sparsity=0.6, schedule="cubic", frequency=10, end_fraction=0.5)
    session = PruningSession(h, alg, optimizer, total_steps=steps)
    data = random_batches(6, seed=2)
    violations, grad_leaks = 0, 0
    for t in range(steps):
        x, y = (torch.from_numpy(a) for a in data[t % len(data)])
        session.before_step()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        session.after_backward()
        pruned = _pruned_entries(alg)
        grad_leaks += sum(int(torch.count_nonzero(h.module(n).weight.grad[w])) for n, w in pruned.items())
        optimizer.step()
        session.after_optimizer_step()
        violations += sum(int(torch.count_nonzero(h.weight(n)[w])) for n, w in pruned.items())
    session.finish()
    assert (violations, grad_leaks) == (0, 0)
    assert session.step == steps
    total = sum(l.numel for l in h.layers)
    zeros = sum(int((h.weight(l.name) == 0).sum()) for l in h.layers)
    assert zeros == total - int(np.floor(total * 0.4 + 0.5))
    state = session.state_dict()
    assert state["step"] == steps
    assert sorted(state["algorithm"]["masks"]) == sorted(l.name for l in h.layers)
    for name, m in state["algorithm"]["masks"].items():
        assert isinstance(m, np.ndarray)
        np.testing.assert_array_equal(m == 0, OPS.to_numpy(h.weight(name)) == 0)
