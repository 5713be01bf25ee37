"""The behaviour every backend must show, written once and run on each (the ``backend`` fixture).

The checks name no framework: they go through the backend's protocol (``Ops``, ``model_handle``,
``wrap``, ``Trainer``, ``PruningSession``) and the model handle. What they cannot say without a
framework (a tiny user network, the facts a module states, the framework's seed, an optimizer's
settings and state, one step of a plain training loop) comes from ``<backend>_kit.py`` beside
this file, chosen by the backend's name. What only one framework has is in
``test_torch_only.py`` / ``test_mindspore_only.py``.

* ``TestOps``: the op contract beyond ``conformance/cases/ops.py`` (whose ``ops/*`` cases check
  every op's values against NumPy on both backends): dtypes and conversions, seeded generators,
  precision, broadcasting, negative / tuple axes, edge sizes, more SVD shapes, the sign rule under
  negation, batched QR / eigh, gradients of unused parameters.
* ``TestModels``: discovery of the reference models, spatial sizes, refusals at the door.
* ``TestHandleState``: state by shared name, the seeded initialisation.
* ``TestTraining``: ``make_optimizer``, the ``Trainer`` and a plain loop around a
  ``PruningSession`` keeping pruned weights (and their optimizer state) exactly zero.
"""
import numpy as np
import pytest

from backend_helpers import check_qr_and_eigh, kit_for, nonzero_at, pruned, random_batches, state_at_pruned, tiny_handle
from prunekit.algorithms import make_algorithm
from prunekit.contract.ops import fix_svd_signs
from prunekit.contract.reference_models import MODELS
from prunekit.errors import ConfigError, ModelError, PlanError


@pytest.fixture(scope="module")
def kit(backend):
    return kit_for(backend)


@pytest.fixture(scope="module")
def ops(backend):
    return backend.Ops()


def _svd_reference(x):
    """NumPy economy SVD with the documented sign rule applied (largest-|.| entry of U's columns > 0)."""
    u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    idx = np.argmax(np.abs(u), axis=-2)                           # first on ties
    picked = np.take_along_axis(u, idx[..., None, :], axis=-2)    # (..., 1, k)
    signs = np.where(picked >= 0, 1.0, -1.0)
    return u * signs, s, vh * np.swapaxes(signs, -1, -2)


# ====================================================================== the op contract
class TestOps:
    """What the conformance cases ``ops/*`` leave out (their values against NumPy are not repeated)."""

    def test_dtypes_and_conversions(self, ops):
        a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
        for dt, npdt in [("float32", np.float32), ("float64", np.float64), ("int32", np.int32), ("int64", np.int64),
                         ("bool", np.bool_)]:
            t = ops.asarray(a, dt)
            assert ops.dtype(t) == dt
            np.testing.assert_array_equal(ops.to_numpy(t), a.astype(npdt))
            assert ops.dtype(ops.zeros((2,), dt)) == dt and ops.dtype(ops.ones((2,), dt)) == dt
        t = ops.asarray(a, "float32")
        assert ops.dtype(ops.asarray(t, "float64")) == "float64"            # from a tensor: a cast
        back = ops.to_numpy(t)
        back[0, 0] = 99.0                                                   # to_numpy is a copy
        assert ops.to_numpy(t)[0, 0] == np.float32(a[0, 0])
        assert ops.shape(ops.asarray(3.5)) == ()
        assert ops.shape(ops.asarray([1, 2, 3], like=t)) == (3,)
        assert ops.dtype(ops.zeros((2, 3))) == "float32" and ops.dtype(ops.ones((4,), "int32")) == "int32"
        assert ops.dtype(ops.arange(5)) == "int64" and ops.dtype(ops.arange(3, "int32")) == "int32"
        z = ops.zeros_like(t)
        o = ops.ones_like(ops.asarray(a, "float64"))
        assert ops.shape(z) == (3, 4) and ops.dtype(z) == "float32" and ops.to_numpy(z).sum() == 0
        assert ops.dtype(o) == "float64" and ops.to_numpy(o).sum() == 12
        np.testing.assert_array_equal(ops.to_numpy(ops.cast(ops.asarray([1.7, -2.2, 0.0]), "int64")), [1, -2, 0])
        assert ops.dtype(ops.cast(ops.asarray([1.0]), "float64")) == "float64"
        assert ops.item(ops.asarray([[2.5]])) == 2.5 and isinstance(ops.item(ops.asarray(2.5)), float)

    def test_parameter_and_stop_gradient(self, ops, kit):
        a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
        p = ops.parameter(a, "p")
        assert kit.is_parameter(p) and ops.dtype(p) == "float32"
        np.testing.assert_array_equal(ops.to_numpy(p), a.astype(np.float32))
        x = ops.parameter(np.array([1.0, 2.0], np.float32), "x")
        loss, grads = ops.value_and_grad(lambda: ops.sum(ops.stop_gradient(x * 2) * x), {"x": x})
        assert loss == pytest.approx(10.0)
        np.testing.assert_array_equal(ops.to_numpy(grads["x"]), [2.0, 4.0])   # only the non-stopped factor

    def test_random_generators_seeded(self, ops, kit):
        kit.seed_framework(1)
        a = ops.to_numpy(ops.random_normal((20000,), seed=3))
        kit.seed_framework(2)                                   # the framework's global seed does not matter
        b = ops.to_numpy(ops.random_normal((20000,), seed=3))
        c = ops.to_numpy(ops.random_normal((20000,), seed=4))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05 and a.dtype == np.float32
        u = ops.to_numpy(ops.random_uniform((4, 5000), seed=9))
        np.testing.assert_array_equal(u, ops.to_numpy(ops.random_uniform((4, 5000), seed=9)))
        assert u.shape == (4, 5000) and u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02

    def test_precision_operators_and_broadcasting(self, ops, kit):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 5)).astype(np.float32)
        y = rng.standard_normal((4, 5)).astype(np.float32)
        pos = np.abs(x) + 0.1
        T, N = ops.asarray, ops.to_numpy
        close = dict(rtol=1e-6, atol=1e-6)                      # tighter than the case's 1e-5
        np.testing.assert_allclose(N(ops.sqrt(T(pos))), np.sqrt(pos), **close)
        np.testing.assert_allclose(N(ops.log(T(pos))), np.log(pos), **close)
        np.testing.assert_allclose(N(ops.sigmoid(T(x))), 1 / (1 + np.exp(-x.astype(np.float64))), **close)
        np.testing.assert_allclose(N(ops.exp(T(x))), np.exp(x), rtol=kit.EXP_RTOL)
        np.testing.assert_array_equal(N(ops.clip(T(x), None, 0.2)), np.minimum(x, 0.2))     # one-sided clips
        np.testing.assert_array_equal(N(ops.clip(T(x), -0.2, None)), np.maximum(x, -0.2))
        # operators and broadcasting follow NumPy
        np.testing.assert_array_equal(N(T(x) * T(y[:1])), x * y[:1])
        np.testing.assert_array_equal(N(T(x) + T(y[:, :1]) - T(x[:1, :1])), x + y[:, :1] - x[:1, :1])
        np.testing.assert_allclose(N(T(x) / T(pos)), x / pos, rtol=1e-6)
        np.testing.assert_array_equal(N(-T(x)), -x)
        np.testing.assert_array_equal(N(ops.greater(T(x), T(np.float32(0.1)))), x > np.float32(0.1))
        np.testing.assert_array_equal(N(ops.equal(ops.reshape(ops.arange(3), (3, 1)), ops.asarray([[0, 2]], "int64"))),
                                      np.arange(3)[:, None] == np.array([[0, 2]]))

    def test_reductions_over_every_axis_form(self, ops):
        """3-D input; None, positive, negative and tuple axes; keepdims (the case: 2-D, one axis)."""
        x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
        for axis in (None, 0, 1, -1, (0, 2)):
            for keepdims in (False, True):
                where = f"axis={axis} keepdims={keepdims}"
                for op, ref in [(ops.sum, np.sum), (ops.mean, np.mean)]:
                    got = ops.to_numpy(op(ops.asarray(x), axis=axis, keepdims=keepdims))
                    want = ref(x.astype(np.float64), axis=axis, keepdims=keepdims)
                    assert got.shape == np.shape(want), (op.__name__, where)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=where)
                got = ops.to_numpy(ops.norm(ops.asarray(x), axis=axis, keepdims=keepdims))
                want = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axis, keepdims=keepdims))
                assert got.shape == np.shape(want), where
                np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=where)
                if not isinstance(axis, tuple):                  # max / min take one axis or None
                    for op, ref in [(ops.max, np.max), (ops.min, np.min)]:
                        got = ops.to_numpy(op(ops.asarray(x), axis=axis, keepdims=keepdims))
                        want = ref(x, axis=axis, keepdims=keepdims)
                        assert got.shape == np.shape(want), (op.__name__, where)
                        np.testing.assert_array_equal(got, want, err_msg=where)

    def test_argmax_and_cumsum_beyond_the_case(self, ops):
        T, N = ops.asarray, ops.to_numpy
        x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -7.0]], np.float32)
        np.testing.assert_array_equal(N(ops.argmax(T(x), axis=-1)), [1, 0, 0])       # first on ties
        assert ops.dtype(ops.argmax(T(x), axis=0)) == "int64"
        rng = np.random.default_rng(2)
        ties = rng.integers(0, 3, size=(5, 40, 6)).astype(np.float32)                 # ties along every axis
        for axis in (0, 1, 2, -2):
            np.testing.assert_array_equal(N(ops.argmax(T(ties), axis)), np.argmax(ties, axis), err_msg=str(axis))
        nan = np.array([[1.0, np.nan, 3.0, np.nan], [0.0, 5.0, 5.0, 1.0]], np.float32)
        np.testing.assert_array_equal(N(ops.argmax(T(nan), 1)), np.argmax(nan, 1))     # NaN counts as the max
        y = rng.standard_normal((4, 6)).astype(np.float32)
        for axis in (0, 1, -1):
            c = ops.cumsum(T(y), axis)
            assert ops.dtype(c) == "float32"
            np.testing.assert_allclose(N(c), np.cumsum(y.astype(np.float64), axis), rtol=1e-5, atol=1e-6)
        ints = rng.integers(0, 3, size=50).astype(np.int32)
        c = ops.cumsum(T(ints, "int32"), 0)
        assert ops.dtype(c) == "int32"
        np.testing.assert_array_equal(N(c), np.cumsum(ints))

    def test_shape_ops_beyond_the_case(self, ops):
        T, N = ops.asarray, ops.to_numpy
        x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
        np.testing.assert_array_equal(N(ops.reshape(T(x), (4, -1))), x.reshape(4, -1))
        np.testing.assert_array_equal(N(ops.flatten(T(x))), x.reshape(-1))
        np.testing.assert_array_equal(N(ops.swap_last(T(x))), np.swapaxes(x, -1, -2))
        np.testing.assert_array_equal(N(ops.concat([T(x), T(x[:1])], axis=0)), np.concatenate([x, x[:1]], 0))
        np.testing.assert_array_equal(N(ops.concat([T(x), T(x)], axis=-1)), np.concatenate([x, x], -1))
        np.testing.assert_array_equal(N(ops.stack([T(x), T(x * 2)], axis=1)), np.stack([x, x * 2], 1))
        for axis, idx in [(0, [1, 0, 1]), (1, [2]), (2, [3, 0]), (-1, [1, 1, 2]), (1, np.array([0, 2]))]:
            np.testing.assert_array_equal(N(ops.take(T(x), idx, axis)), np.take(x, idx, axis))
        np.testing.assert_array_equal(N(ops.take(T(x), ops.asarray([2, 0], "int64"), 1)), np.take(x, [2, 0], 1))
        np.testing.assert_array_equal(N(ops.take(T(x), ops.asarray([3], "int32"), 2)), np.take(x, [3], 2))
        v = np.arange(10, dtype=np.float32)
        pieces = ops.split(T(v), [3, 0, 5, 2])                 # an empty piece included
        assert [ops.shape(p) for p in pieces] == [(3,), (0,), (5,), (2,)]
        for got, want in zip(pieces, np.split(v, [3, 3, 8])):
            np.testing.assert_array_equal(N(got), want)
        rng = np.random.default_rng(4)
        a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
        b = rng.standard_normal((5, 6)).astype(np.float32)           # matmul broadcasts a matrix over a batch
        np.testing.assert_allclose(N(ops.matmul(T(a), T(b))), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("shape", [(5, 5), (2, 3, 4, 9), (1, 1)])
    def test_svd_convention_on_more_shapes(self, ops, shape):
        """Square, twice-batched and 1x1 inputs (the case has tall, wide, batched, rank-deficient)."""
        x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        u, s, vh = (ops.to_numpy(t) for t in ops.svd(ops.asarray(x)))
        k = min(shape[-2:])
        assert u.shape == shape[:-1] + (k,) and s.shape == shape[:-2] + (k,) and vh.shape == shape[:-2] + (k, shape[-1])
        assert u.dtype == s.dtype == vh.dtype == np.float32
        assert np.all(np.diff(s, axis=-1) <= 0)                                       # descending
        np.testing.assert_allclose((u * s[..., None, :]) @ vh, x, atol=1e-5)
        idx = np.argmax(np.abs(u), axis=-2)                                          # sign rule on U itself
        assert np.all(np.take_along_axis(u, idx[..., None, :], axis=-2) > 0)
        ru, rs, rvh = _svd_reference(x)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(u, ru, atol=1e-4)
        np.testing.assert_allclose(vh, rvh, atol=1e-4)

    def test_svd_sign_rule_under_negation(self, ops):
        x = np.random.default_rng(6).standard_normal((5, 3)).astype(np.float32)
        u1, _, vh1 = (ops.to_numpy(t) for t in ops.svd(ops.asarray(x)))
        u2, _, vh2 = (ops.to_numpy(t) for t in ops.svd(ops.asarray(-x)))
        np.testing.assert_allclose(u1, u2, atol=1e-5)                  # -x = U S (-Vh): U fixed, Vh flips
        np.testing.assert_allclose(vh1, -vh2, atol=1e-5)

    def test_svd_sign_fix_on_the_backend_tensors(self, ops):
        """The core's fix_svd_signs with this backend's ops (argmax, arange, reshape, equal, cast, sum, where)."""
        rng = np.random.default_rng(10)
        u = rng.standard_normal((2, 4, 3)).astype(np.float32)
        vh = rng.standard_normal((2, 3, 5)).astype(np.float32)
        fu, _, fvh = fix_svd_signs(ops, ops.asarray(u), ops.asarray(np.ones((2, 3), np.float32)), ops.asarray(vh))
        signs = np.where(np.take_along_axis(u, np.argmax(np.abs(u), -2)[:, None, :], -2) >= 0, 1.0, -1.0)
        np.testing.assert_array_equal(ops.to_numpy(fu), u * signs)
        np.testing.assert_array_equal(ops.to_numpy(fvh), vh * np.swapaxes(signs, -1, -2))

    def test_batched_qr_and_eigh(self, ops):
        """Batches, R's triangle and eigenvalue order (the case: one matrix each)."""
        check_qr_and_eigh(ops)

    def test_sort_and_kth_largest_edges(self, ops):
        """A 0-d result, every k of small sizes (1, 2, 33), k = n, heavy ties (the case: 4 k of 35)."""
        rng = np.random.default_rng(8)
        x = rng.integers(-3, 4, size=200).astype(np.float32)
        ref = np.sort(x)[::-1]
        np.testing.assert_array_equal(ops.to_numpy(ops.sort_descending(ops.asarray(x))), ref)
        for k in (1, 2, 57, 100, 101, 199, 200):
            got = ops.kth_largest(ops.asarray(x), k)
            assert ops.shape(got) == ()
            assert ops.item(got) == ref[k - 1], k
        for n in (1, 2, 33):
            y = rng.standard_normal(n).astype(np.float32)
            for k in range(1, n + 1):
                assert ops.item(ops.kth_largest(ops.asarray(y), k)) == np.sort(y)[::-1][k - 1], (n, k)

    def test_value_and_grad_beyond_the_case(self, ops, kit):
        """A float loss, a cubic term, an unused parameter (zero gradient), parameters untouched."""
        rng = np.random.default_rng(9)
        A = rng.standard_normal((4, 3)).astype(np.float32)
        b = rng.standard_normal(4).astype(np.float32)
        w0 = rng.standard_normal(3).astype(np.float32)
        v0 = rng.standard_normal((2, 2)).astype(np.float32)
        params = {"w": ops.parameter(w0, "w"), "v": ops.parameter(v0, "v"),
                  "unused": ops.parameter(np.ones(5), "unused")}
        assert all(kit.is_parameter(p) for p in params.values())
        np.testing.assert_array_equal(ops.to_numpy(params["v"]), v0)
        At, bt = ops.asarray(A), ops.asarray(b)

        def loss_fn():
            r = ops.matmul(At, params["w"]) - bt
            return ops.sum(r * r) + ops.sum(params["v"] * params["v"] * params["v"])

        loss, grads = ops.value_and_grad(loss_fn, params)
        r = A.astype(np.float64) @ w0 - b
        assert isinstance(loss, float)
        assert loss == pytest.approx(float(r @ r + (v0.astype(np.float64) ** 3).sum()), rel=1e-5)
        assert set(grads) == set(params)
        np.testing.assert_allclose(ops.to_numpy(grads["w"]), 2 * A.T.astype(np.float64) @ r, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ops.to_numpy(grads["v"]), 3 * v0.astype(np.float64) ** 2, rtol=1e-5)
        np.testing.assert_array_equal(ops.to_numpy(grads["unused"]), np.zeros(5))
        np.testing.assert_array_equal(ops.to_numpy(params["w"]), w0)          # parameters untouched


# ====================================================================== models and discovery
#: (conv, linear) counts from the architectures: ResNet-(6n+2) has 6n+1 convs; VGG-16/19 have 13/16;
#: MobileNetV2: stem + 17 blocks x 3 + 4 projection shortcuts + final 1x1 = 57; MNIST CNN 2 + 2;
#: the projection-shortcut ResNets ("b") add the two 1x1 shortcut convs of stages 2 and 3.
EXPECTED_COUNTS = {"resnet20": (19, 1), "resnet32": (31, 1), "resnet56": (55, 1), "vgg16": (13, 1), "vgg19": (16, 1),
                   "mobilenetv2": (57, 1), "mnist_cnn": (2, 2),
                   "resnet20b": (21, 1), "resnet32b": (33, 1), "resnet56b": (57, 1)}


class TestModels:
    @pytest.mark.parametrize("name", sorted(MODELS))
    def test_discovery_of_reference_models(self, backend, kit, name):
        in_ch, size = (1, 28) if name == "mnist_cnn" else (3, 32)
        model = kit.build_model(name, 10, in_ch)
        layers = backend.wrap(model, (in_ch, size, size), name).layers
        modules = kit.prunable_modules(model)
        assert [l.name for l in layers] == list(modules)                        # every conv/linear, model order
        assert (sum(l.kind == "conv" for l in layers), sum(l.kind == "linear" for l in layers)) == EXPECTED_COUNTS[name]
        assert (sum(m["kind"] == "conv" for m in modules.values()),
                sum(m["kind"] == "linear" for m in modules.values())) == EXPECTED_COUNTS[name]
        for l in layers:
            m = modules[l.name]
            assert l.kind == m["kind"] and l.weight_shape == m["weight_shape"] and l.has_bias == m["has_bias"], l.name
            assert (l.in_channels, l.out_channels) == (m["in_channels"], m["out_channels"]), l.name
            assert l.numel == m["numel"], l.name
            if l.kind == "conv":
                assert l.groups == m["groups"] and l.kernel_size == m["kernel_size"] and l.stride == m["stride"], l.name
                assert l.padding == ((l.kernel_size[0] - 1) // 2,) * 2, l.name
        depthwise = [l for l in layers if l.is_depthwise]
        if name == "mobilenetv2":
            assert len(depthwise) == 17                                        # one per inverted-residual block
            assert all(l.groups == l.in_channels == l.out_channels and l.weight_shape[1] == 1 for l in depthwise)
            assert all(l.name.endswith("conv2") and l.name.startswith("layers.") for l in depthwise)
            assert [l for l in layers if l.groups > 1] == depthwise
        else:
            assert depthwise == [] and all(l.groups == 1 for l in layers)
        assert kit.hooks_left(model) == 0                                       # the probe leaves no hook behind

    def test_resnet20_spatial_sizes(self, backend):
        h = backend.model_handle("resnet20", seed=0)
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
                assert (l.input_hw, l.output_hw) == ((inp, inp), (out, out)), l.name
                assert l.stride == ((2, 2) if inp != out else (1, 1))
                assert l.macs_per_weight == out * out

    def test_model_without_prunable_layer_refused(self, backend, kit):
        with pytest.raises(ModelError, match="prunable"):
            backend.wrap(kit.relu_only(), (3, 8, 8), "relu_only")
        with pytest.raises(ModelError, match="bn_only"):
            backend.wrap(kit.bn_only(), (3, 8, 8), "bn_only")

    @pytest.mark.parametrize("model, layer", [("resnet20", "layer2.1.conv2"), ("mnist_cnn", "conv2")])
    def test_nan_weight_refused_by_bind_without_change(self, backend, model, layer):
        for bad in (float("nan"), float("inf")):
            h = backend.model_handle(model, 10, *((1, 28) if model == "mnist_cnn" else (3, 32)), seed=1)
            w = h.weights_numpy()[layer]
            w[3, 2, 1, 0] = bad
            h.set_weight(layer, h.ops.asarray(w))
            before = h.state_numpy()
            alg = make_algorithm("magnitude", sparsity=0.5, schedule="oneshot")
            with pytest.raises(ModelError, match=layer):
                alg.bind(h, total_steps=10)
            after = h.state_numpy()
            for k in before:
                np.testing.assert_array_equal(after[k], before[k], err_msg=k)
            assert alg.masks == {}


# ====================================================================== handle state
class TestHandleState:
    def test_state_numpy_round_trip_and_strict_errors(self, backend):
        a = backend.model_handle("resnet20", seed=0)
        b = backend.model_handle("resnet20", seed=1)
        sa = a.state_numpy()
        sa["bn1.running_mean"] = np.linspace(-1, 1, 16).astype(np.float32)   # BN statistics travel too
        sa["bn1.running_var"] = np.linspace(0.5, 2, 16).astype(np.float32)
        b.load_state_numpy(sa)
        sb = b.state_numpy()
        assert set(sb) == set(sa)
        for k in sa:
            np.testing.assert_array_equal(sb[k], sa[k], err_msg=k)
        a.load_state_numpy(sa)
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        np.testing.assert_array_equal(a.predict(x), b.predict(x))           # eval mode, same state: same logits

        c = backend.model_handle("resnet20", seed=2)
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
        with pytest.raises(PlanError, match="fc.weight"):                    # shapes are checked without strict too
            c.load_state_numpy({"fc.weight": np.zeros((100, 64), np.float32)}, strict=False)
        with pytest.raises(PlanError, match="fc.weight"):                    # ... before anything is written
            c.load_state_numpy({"fc.bias": np.ones(10, np.float32), "fc.weight": np.zeros((100, 64), np.float32)},
                               strict=False)
        after = c.state_numpy()
        for k in before:                                                      # failed loads changed nothing
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        c.load_state_numpy({"fc.bias": np.full(10, 0.5, np.float32)}, strict=False)   # partial load
        assert np.all(c.state_numpy()["fc.bias"] == 0.5)
        np.testing.assert_array_equal(c.state_numpy()["conv1.weight"], before["conv1.weight"])

    def test_initialize_is_seeded_and_framework_rng_independent(self, backend, kit):
        kit.seed_framework(123)
        a = backend.model_handle("resnet20", seed=7).state_numpy()
        kit.seed_framework(456)
        b = backend.model_handle("resnet20", seed=7).state_numpy()
        c = backend.model_handle("resnet20", seed=8).state_numpy()
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
        np.testing.assert_array_equal(a["fc.bias"], 0)
        # convs: Kaiming normal with fan-out; linear: normal with std 1/sqrt(fan-in)
        # (prunekit/contract/reference_models.py)
        w = a["layer3.1.conv1.weight"]
        assert w.std() == pytest.approx(np.sqrt(2.0 / (64 * 9)), rel=0.05) and abs(w.mean()) < 0.005
        assert a["fc.weight"].std() == pytest.approx(np.sqrt(1.0 / 64), rel=0.1)
        # different layers get different draws even with equal shapes
        assert not np.array_equal(a["layer1.0.conv1.weight"], a["layer1.0.conv2.weight"])


# ====================================================================== training
class TestTraining:
    def test_make_optimizer_semantics_and_errors(self, backend, kit):
        h = tiny_handle(backend, kit)
        sgd = kit.make_optimizer(h.model, "SGD", lr=0.1, momentum=0.9, weight_decay=5e-4)   # any case
        s = kit.optimizer_settings(sgd)
        assert s["kind"] == "sgd" and s["momentum"] == pytest.approx(0.9) and s["weight_decay"] == pytest.approx(5e-4)
        assert s["decays_every_parameter"]                                  # BN weight/bias decay too
        assert s["parameters"] == len(h.parameters_by_name())
        adam = kit.make_optimizer(h.model, "adam", lr=1e-3, weight_decay=1e-4)
        s = kit.optimizer_settings(adam)
        assert s["kind"] == "adam" and s["weight_decay"] == pytest.approx(1e-4)
        x, y = random_batches(kit, 1)[0]
        for opt, moments in ((sgd, 1), (adam, 2)):                          # SGD: momentum; Adam: two moments
            kit.PlainLoop(h, opt).step(backend.PruningSession(h, None, opt, total_steps=1), x, y)
            state = kit.optimizer_state(opt, h)
            assert sorted(state) == sorted(l.name for l in h.layers)
            assert all(len(v) == moments for v in state.values()), {n: len(v) for n, v in state.items()}
        for bad in ("rmsprop", "", "sgdd"):
            with pytest.raises(ConfigError, match="optimizer"):
                kit.make_optimizer(h.model, bad)
        with pytest.raises(ConfigError, match="optimizer"):
            backend.Trainer(h, None, optimizer="lamb")

    @pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
    def test_trainer_keeps_pruned_weights_exactly_zero(self, backend, kit, optimizer, lr):
        """One mask, set at the first step, held through ``kit.TRAINER_STEPS`` steps with momentum,
        weight decay or Adam's moments: pruned weights and their optimizer state stay exactly zero."""
        steps = kit.TRAINER_STEPS
        h = tiny_handle(backend, kit)
        alg = make_algorithm("magnitude", sparsity=0.75, schedule="oneshot")
        trainer = backend.Trainer(h, alg, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=5e-4,
                                  total_steps=steps, lr_schedule="constant")
        s = kit.optimizer_settings(trainer.optimizer)
        assert s["kind"] == optimizer and s["weight_decay"] == pytest.approx(5e-4)
        if optimizer == "sgd":
            assert s["momentum"] == pytest.approx(0.9)
        data = random_batches(kit, 16)
        trainer.train_step(*data[0])
        where = pruned(alg, h.ops)
        first_masks = {n: h.ops.to_numpy(m) for n, m in alg.masks.items()}
        start = h.weights_numpy()
        total = sum(int(w.size) for w in where.values())
        assert sum(int(w.sum()) for w in where.values()) == total - round(total * 0.25)
        violations = 0
        for t in range(1, steps):
            loss = trainer.train_step(*data[t % len(data)])
            violations += nonzero_at(h, where)
        trainer.finish()
        assert violations == 0
        assert trainer.session.step == steps
        for n, m in alg.masks.items():                                      # the mask was set once, at the start
            np.testing.assert_array_equal(h.ops.to_numpy(m), first_masks[n])
        assert state_at_pruned(kit, trainer.optimizer, h, where) == 0.0     # momentum / moments stay zero too
        end = h.weights_numpy()
        assert max(float(np.abs(end[n] - start[n])[~w].max()) for n, w in where.items()) > 1e-3   # kept ones trained
        assert np.isfinite(float(loss))

    @pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
    def test_trainer_with_growing_masks_schedule_and_evaluate(self, backend, kit, optimizer, lr):
        """Masks growing on a cubic schedule under a cosine learning rate; evaluate switches the
        model to eval mode and the next step back to training."""
        steps = 120
        h = tiny_handle(backend, kit, 2)
        alg = make_algorithm("magnitude", sparsity=0.75, schedule="cubic", frequency=10, end_fraction=0.5)
        trainer = backend.Trainer(h, alg, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=5e-4,
                                  total_steps=steps, lr_schedule="cosine")
        data = random_batches(kit, 8, seed=2)
        violations, leaks = 0, 0.0
        for t in range(steps):
            loss = trainer.train_step(*data[t % len(data)])
            where = pruned(alg, h.ops)
            violations += nonzero_at(h, where)
            if t % 10 == 0:
                leaks = max(leaks, state_at_pruned(kit, trainer.optimizer, h, where))
        trainer.finish()
        assert violations == 0 and leaks == 0.0
        assert kit.learning_rate(trainer.optimizer) == pytest.approx(trainer.lr.lr_at(steps - 1), rel=1e-5)
        assert np.isfinite(float(loss))
        loss_val, acc = trainer.evaluate(data[:3])
        assert np.isfinite(loss_val) and 0.0 <= acc <= 1.0
        assert trainer.model.training is False
        trainer.train_step(*data[0])                                        # back to training after evaluate
        assert trainer.model.training is True

    def test_mask_changes_clear_optimizer_state(self, backend, kit):
        """Masks that grow during training: the momentum of newly pruned weights must be cleared."""
        steps = 200
        h = tiny_handle(backend, kit, 1)
        alg = make_algorithm("magnitude", sparsity=0.9, schedule="cubic", frequency=10, end_fraction=0.8)
        trainer = backend.Trainer(h, alg, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                                  total_steps=steps, lr_schedule="constant")
        data = random_batches(kit, 8, seed=1)
        changes, worst_state, violations, prev = 0, 0.0, 0, None
        for t in range(steps):
            trainer.train_step(*data[t % len(data)])
            where = pruned(alg, h.ops)
            key = tuple(int(w.sum()) for w in where.values())
            changes += key != prev
            prev = key
            violations += nonzero_at(h, where)
            worst_state = max(worst_state, state_at_pruned(kit, trainer.optimizer, h, where))
        assert changes >= 10                                                # the masks really changed
        assert violations == 0 and worst_state == 0.0

    def test_pruning_session_in_a_plain_loop(self, backend, kit):
        """A user's loop and optimizer (``kit.PlainLoop``, ``kit.user_optimizer``) around a
        PruningSession: no pruned weight, no gradient stepped with, is ever non-zero."""
        steps = 120
        h = tiny_handle(backend, kit, 2)
        optimizer = kit.user_optimizer(h.model)
        alg = make_algorithm("magnitude", sparsity=0.6, schedule="cubic", frequency=10, end_fraction=0.5)
        session = backend.PruningSession(h, alg, optimizer, total_steps=steps)
        loop = kit.PlainLoop(h, optimizer)
        data = random_batches(kit, 6, seed=2)
        violations, grad_leaks = 0, 0
        for t in range(steps):
            grads = loop.step(session, *data[t % len(data)])
            where = pruned(alg, h.ops)
            grad_leaks += sum(int(np.count_nonzero(grads[n][w])) for n, w in where.items())
            violations += nonzero_at(h, where)
        session.finish()
        assert (violations, grad_leaks) == (0, 0)
        assert session.step == steps and np.isfinite(loop.loss)
        total = sum(l.numel for l in h.layers)
        w = h.weights_numpy()
        assert sum(int((w[l.name] == 0).sum()) for l in h.layers) == total - int(np.floor(total * 0.4 + 0.5))
        state = session.state_dict()
        assert state["step"] == steps
        assert sorted(state["algorithm"]["masks"]) == sorted(l.name for l in h.layers)
        for name, m in state["algorithm"]["masks"].items():
            assert isinstance(m, np.ndarray)
            np.testing.assert_array_equal(m == 0, w[name] == 0)

    def test_trainer_without_algorithm_and_step_skipping(self, backend, kit):
        data = random_batches(kit, 2, seed=4)
        h = tiny_handle(backend, kit, 4)
        trainer = backend.Trainer(h, None, "sgd", 0.05, 0.9, 0.0, total_steps=5, lr_schedule="constant", **kit.EAGER)
        before = h.state_numpy()
        trainer.train_step(*data[0])
        after = h.state_numpy()
        assert any(not np.array_equal(before[k], after[k]) for k in before)   # dense training moves weights

        class Skipper(type(make_algorithm("magnitude", sparsity=0.5))):
            def should_step_optimizer(self, step):
                return step % 2 == 1

        h = tiny_handle(backend, kit, 5)
        trainer = backend.Trainer(h, Skipper(sparsity=0.5, schedule="oneshot"), "sgd", 0.05, 0.9, 0.0, total_steps=4,
                                  lr_schedule="constant")
        trainer.train_step(*data[0])                                        # step 0: masks set, no update
        w0 = h.weights_numpy()
        trainer.train_step(*data[1])                                        # step 1: an update
        w1 = h.weights_numpy()
        assert any(not np.array_equal(w0[n], w1[n]) for n in w0)
        assert trainer.session.step == 2
