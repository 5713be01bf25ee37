"""What only the MindSpore backend has; everything both backends must do is in
``test_backend_behaviour.py``.

The host and device paths of SVD / QR / eigh and their environment switches; named Parameters
and shared state names over MindSpore's own (gamma/beta/moving_*); pad modes; the device check;
in-place weight writes; optimizer state found by name; and the two ways MindSpore users train:
the functional ``value_and_grad`` loop (1,000 steps) and ``Model.train`` with the callback.
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
import mindspore.nn as nn  # noqa: E402
import mindspore.ops as msops  # noqa: E402

from backend_helpers import check_qr_and_eigh, nonzero_at, pruned, random_batches, state_at_pruned, tiny_handle  # noqa: E402
import mindspore_kit as kit  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.backends.mindspore import (BACKEND, PruningCallback, PruningSession,  # noqa: E402
                                         PruningTrainOneStepCell, make_optimizer, model_handle)
from prunekit.backends.mindspore.driver import optimizer_state_by_layer  # noqa: E402
from prunekit.backends.mindspore.layers import conv_padding  # noqa: E402
from prunekit.backends.mindspore.ops import MindSporeOps, check_device  # noqa: E402
from prunekit.backends.mindspore.optimizers import Adam  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402

OPS = MindSporeOps()
HOST = MindSporeOps(svd="host", qr="host", eigh="host")


def _svd_reference(x):
    """NumPy economy SVD with the documented sign rule applied (largest-|.| entry of U's columns > 0)."""
    u, s, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    idx = np.argmax(np.abs(u), axis=-2)
    signs = np.where(np.take_along_axis(u, idx[..., None, :], axis=-2) >= 0, 1.0, -1.0)
    return u * signs, s, vh * np.swapaxes(signs, -1, -2)


# ====================================================================== host and device linear algebra
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 4), (2, 3, 4, 9), (1, 1)])
def test_svd_convention_on_the_host_path(shape):
    """The host SVD (the conformance suite and the template run the default, device path)."""
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    u, s, vh = (HOST.to_numpy(t) for t in HOST.svd(HOST.asarray(x)))
    k = min(shape[-2:])
    assert u.shape == shape[:-1] + (k,) and s.shape == shape[:-2] + (k,) and vh.shape == shape[:-2] + (k, shape[-1])
    assert u.dtype == s.dtype == vh.dtype == np.float32
    assert np.all(np.diff(s, axis=-1) <= 0)                      # descending
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, x, atol=1e-5)   # (S, U, V) reordered, V transposed
    idx = np.argmax(np.abs(u), axis=-2)                          # sign rule on the returned U
    assert np.all(np.take_along_axis(u, idx[..., None, :], axis=-2) > 0)
    ru, rs, rvh = _svd_reference(x)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, ru, atol=1e-4)
    np.testing.assert_allclose(vh, rvh, atol=1e-4)


def test_svd_modes_agree_and_sign_rule_with_ties():
    x = np.random.default_rng(6).standard_normal((5, 3)).astype(np.float32)
    d = [OPS.to_numpy(t) for t in OPS.svd(OPS.asarray(x))]
    h = [HOST.to_numpy(t) for t in HOST.svd(HOST.asarray(x))]
    for a, b in zip(d, h):
        np.testing.assert_allclose(a, b, atol=1e-5)
    u2, _, vh2 = (HOST.to_numpy(t) for t in HOST.svd(HOST.asarray(-x)))   # -x = U S (-Vh) on the host path too
    np.testing.assert_allclose(h[0], u2, atol=1e-5)
    np.testing.assert_allclose(h[2], -vh2, atol=1e-5)
    # columns of U with two entries of equal largest magnitude: the first one decides the sign (both
    # MindSpore paths return the tie exactly; PyTorch's kernel does not, so the rule has nothing to break there)
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


@pytest.mark.parametrize("ops", [HOST, MindSporeOps(eigh="device")], ids=["host", "device"])
def test_qr_and_eigh_modes(ops):
    """QR and eigh on the host path, eigh on the device path (the default is the template's and the case's)."""
    check_qr_and_eigh(ops)


# ====================================================================== models, names, devices
def test_parameters_are_named():
    p = OPS.parameter(np.zeros((2, 2)), "p")
    assert isinstance(p, ms.Parameter) and p.name == "p"


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
    # asymmetric paddings are accepted (tests/backends/test_mindspore_padding.py): the leading pair
    assert conv_padding("c", conv(pad_mode="pad", padding=(0, 1, 0, 1))) == (0, 0)
    assert conv_padding("c", conv(stride=2), (8, 8)) == (0, 0)


def test_device_check():
    check_device(None)
    check_device("cpu")
    check_device("CPU")
    with pytest.raises(ConfigError, match="GPU"):
        check_device("cuda:0")
    with pytest.raises(ConfigError, match="unknown device"):
        model_handle("mnist_cnn", 10, 1, 28, device="tpu")


def test_weight_writes_are_in_place():
    h = model_handle("mnist_cnn", 10, 1, 28, seed=0)
    p = h.module("fc2").weight
    w = h.weights_numpy()["fc2"]
    mask = (np.arange(w.size).reshape(w.shape) % 3 != 0).astype(np.float32)
    h.mul_weight_("fc2", OPS.asarray(mask))
    assert h.module("fc2").weight is p                                    # same Parameter object
    np.testing.assert_array_equal(OPS.to_numpy(p), w * mask)
    h.set_weight("fc2", OPS.asarray(np.full(w.shape, 0.25, np.float32)))
    assert np.all(OPS.to_numpy(h.weight("fc2")) == 0.25) and h.module("fc2").weight is p


# ====================================================================== optimizers and training loops
def test_optimizer_state_found_by_name():
    """State Parameters are ``<state>.<parameter name>``: Adam's two moments, a user's nn.Momentum."""
    h = tiny_handle(BACKEND, kit)
    weights = {l.name: h.module(l.name).weight for l in h.layers}
    adam = make_optimizer(h.model, "adam", lr=1e-3, weight_decay=1e-4)
    assert isinstance(adam, Adam) and len(adam.moment1) == len(adam.parameters)
    state = optimizer_state_by_layer(adam, weights)
    assert all(sorted(p.name.split(".")[0] for p in v) == ["moment1", "moment2"] for v in state.values())
    momentum = nn.Momentum(h.model.trainable_params(), 0.1, 0.9)            # a user's own optimizer
    state = optimizer_state_by_layer(momentum, weights)
    assert all([p.name.split(".")[0] for p in v] == ["moments"] for v in state.values()) and len(state) == 3


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_functional_loop_keeps_pruned_weights_exactly_zero(optimizer, lr):
    """1,000 steps of MindSpore's own value_and_grad loop around a PruningSession; masks grow
    during the first 600 steps, so the optimizer state is masked on every change."""
    steps = 1000
    h = tiny_handle(BACKEND, kit, 1)
    net = h.model
    opt = make_optimizer(net, optimizer, lr=lr, momentum=0.9, weight_decay=5e-4)
    alg = make_algorithm("magnitude", sparsity=0.8, schedule="cubic", frequency=50, end_fraction=0.6)
    session = PruningSession(h, alg, opt, total_steps=steps)

    def forward(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.jit(ms.value_and_grad(forward, None, opt.parameters))
    data = [tuple(ms.Tensor(a) for a in b) for b in random_batches(kit, 16, seed=1)]
    net.set_train(True)
    start = h.weights_numpy()
    violations, state_leaks, changes, prev = 0, 0.0, 0, None
    for t in range(steps):
        session.before_step()
        loss, grads = grad_fn(*data[t % len(data)])
        grads = session.transform_gradients(grads)
        assert session.should_step()
        opt(grads)
        where = pruned(alg, OPS)
        violations += nonzero_at(h, where)       # zero already before the re-masking
        session.after_optimizer_step()
        key = tuple(int(w.sum()) for w in where.values())
        if key != prev:
            changes += 1
            state_leaks = max(state_leaks, state_at_pruned(kit, opt, h, where))
            prev = key
    session.finish()
    where = pruned(alg, OPS)
    assert changes >= 10                                   # the masks really changed
    assert violations == 0 and state_leaks == 0.0
    assert state_at_pruned(kit, opt, h, where) == 0.0
    assert session.step == steps
    total = sum(l.numel for l in h.layers)
    assert sum(int(w.sum()) for w in where.values()) == total - int(np.floor(total * 0.2 + 0.5))
    end = h.weights_numpy()
    assert max(float(np.abs(end[n] - start[n])[~w].max()) for n, w in where.items()) > 1e-3   # kept ones trained
    assert np.isfinite(float(loss.asnumpy()))
    state = session.state_dict()
    assert state["step"] == steps and sorted(state["algorithm"]["masks"]) == sorted(l.name for l in h.layers)


def test_model_train_with_callback():
    """``mindspore.train.Model.train`` (PyNative, no sink) with PruningTrainOneStepCell + PruningCallback."""
    from mindspore.dataset import NumpySlicesDataset
    from mindspore.train import Model

    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 48).astype(np.int32)
    dataset = NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(8)       # 6 steps per epoch
    h = tiny_handle(BACKEND, kit, 3)
    opt = make_optimizer(h.model, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs, steps = 3, 18
    alg = make_algorithm("magnitude", sparsity=0.7, schedule="cubic", frequency=4, end_fraction=0.7)
    session = PruningSession(h, alg, opt, total_steps=steps)
    loss_net = nn.WithLossCell(h.model, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))

    seen = []

    class Spy(ms.train.Callback):
        def on_train_step_end(self, run_context):
            where = pruned(alg, OPS)
            seen.append((nonzero_at(h, where), state_at_pruned(kit, opt, h, where)))

    start = h.weights_numpy()
    Model(PruningTrainOneStepCell(loss_net, opt, session)).train(
        epochs, dataset, callbacks=[PruningCallback(session), Spy()], dataset_sink_mode=False)
    assert session.step == steps and len(seen) == steps
    assert all(v == 0 and s == 0.0 for v, s in seen)
    where = pruned(alg, OPS)
    total = sum(l.numel for l in h.layers)
    assert sum(int(w.sum()) for w in where.values()) == total - int(np.floor(total * 0.3 + 0.5))   # finish()
    end = h.weights_numpy()
    assert max(float(np.abs(end[n] - start[n])[~w].max()) for n, w in where.items()) > 1e-3
