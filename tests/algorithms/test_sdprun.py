"""sDprun (gRDA with group soft-thresholding over filters): the update against a NumPy
reference of the formula, the lambda schedule, exact zeros under the threshold, structured
sparsity growing on real data, channel removal (compaction equals the masked model), and the
framework-native optimizers matching the neutral path, on both backends."""
import math
import time

import numpy as np
import pytest

from prunekit.conformance.fixtures import ArrayHandle
from prunekit.app import data
from prunekit.algorithms import make_algorithm
from prunekit.algorithms.sdprun import (LambdaSchedule, SDPrunConfig, SDPrunPruner, grda_lambda,
                                        group_soft_threshold, managed_units)
from prunekit.decisions.channel_groups import ChannelGroup
from prunekit.errors import ConfigError, ModelError


def group(name, size, producers, prunable=True):
    return ChannelGroup(name, size, tuple(producers), (), (), (), prunable, {})


def arrays():
    r = np.random.default_rng(5)
    w = {"a": r.standard_normal((6, 3, 3, 3)), "b": r.standard_normal((6, 6, 1, 1)) * 0.5,
         "c": r.standard_normal((8, 6, 3, 3)), "fc": r.standard_normal((4, 8))}
    for name, row in (("a", 0), ("b", 0), ("a", 3), ("c", 2)):  # filters that fall under the threshold
        w[name][row] *= 0.01
    groups = [group("a", 6, ("a", "b")), group("c", 8, ("c",)), group("fc", 4, ("fc",), prunable=False)]
    return {k: v.astype(np.float32) for k, v in w.items()}, groups


def numpy_reference(weights, grads_per_step, units, c, mu, lr):
    acc = {n: weights[n].astype(np.float64) for u in units for n in u}
    out = []
    for n_step, grads in enumerate(grads_per_step, start=1):
        lam = c * lr ** (0.5 + mu) * n_step ** mu
        w = {}
        for n in acc:
            acc[n] = acc[n] - lr * grads[n]
        for u in units:
            sq = sum((acc[n].reshape(acc[n].shape[0], -1) ** 2).sum(1) for n in u)
            size = sum(acc[n][0].size for n in u)
            norm = np.sqrt(sq)
            scale = np.maximum(0.0, 1.0 - lam * math.sqrt(size) / np.maximum(norm, 1e-300))
            for n in u:
                w[n] = acc[n] * scale.reshape((-1,) + (1,) * (acc[n].ndim - 1))
        out.append(w)
    return out


# ---------------------------------------------------------------------------- schedule, config
def test_lambda_schedule_matches_closed_form_and_follows_rate_changes():
    s = LambdaSchedule(5e-4, 0.51)
    for n in range(1, 201):
        v = s.advance(0.1)
        assert v == pytest.approx(grda_lambda(5e-4, 0.51, 0.1, n), rel=1e-12)
    assert grda_lambda(5e-4, 0.51, 0.1, 200) == pytest.approx(5e-4 * 0.1 ** 1.01 * 200 ** 0.51, rel=1e-15)
    # a rate change moves the increments from that step on (as the released gRDA optimizer)
    before = s.value
    v = s.advance(0.01)
    assert v - before == pytest.approx(5e-4 * 0.01 ** 1.01 * (201 ** 0.51 - 200 ** 0.51), rel=1e-9)


@pytest.mark.parametrize("bad", [dict(c=0.0), dict(c=-1e-3), dict(mu=0.5), dict(mu=1.0), dict(mu=0.3),
                                 dict(lr=0.0), dict(c=float("nan")), dict(coupling="layer"), dict(c="big")])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ConfigError):
        SDPrunConfig(**bad)


def test_registered_and_exclude_checked():
    algo = make_algorithm("sdprun", c=1e-3, mu=0.6)
    assert isinstance(algo, SDPrunPruner) and algo.config.mu == 0.6
    w, groups = arrays()
    layers = ArrayHandle(__import__("prunekit.contract.numpy_ops", fromlist=["NumpyOps"]).NumpyOps(), w).layers
    with pytest.raises(ConfigError, match="unknown layer"):
        managed_units(layers, groups, "filter", exclude=("nope",))
    assert managed_units(layers, groups, "filter") == [("a",), ("b",), ("c",)]
    assert managed_units(layers, groups, "channel") == [("a", "b"), ("c",)]
    with pytest.raises(ModelError, match="not layers of this model"):
        managed_units(layers, groups + [group("x", 3, ("ghost",))], "filter")


# ---------------------------------------------------------------------------- the update
@pytest.mark.parametrize("update_on", ["device", "host"])
@pytest.mark.parametrize("coupling", ["filter", "channel"])
def test_update_equals_numpy_reference_over_several_steps(neutral_ops, coupling, update_on):
    ops = neutral_ops
    w, groups = arrays()
    h = ArrayHandle(ops, w)
    c, mu, lr = 0.2, 0.55, 0.1
    algo = SDPrunPruner(SDPrunConfig(c=c, mu=mu, lr=lr, coupling=coupling, update_on=update_on), groups=groups).bind(h, 10)
    assert (algo.uops is ops) == (update_on == "device")
    r = np.random.default_rng(6)
    steps = [{n: (0.02 * r.standard_normal(w[n].shape)).astype(np.float32) for n in w} for _ in range(5)]
    ref = numpy_reference(w, steps, algo.units, c, mu, lr)
    zeros_seen = 0
    for k, grads in enumerate(steps):
        algo.step_with({n: ops.asarray(g) for n, g in grads.items()})
        for n in ("a", "b", "c"):
            got = ops.to_numpy(h.weight(n))
            np.testing.assert_allclose(got, ref[k][n], rtol=1e-5, atol=1e-6)
            # exactly-zero filters are exactly where the reference is zero
            ref_zero = np.all(ref[k][n].reshape(len(got), -1) == 0, axis=1)
            assert np.array_equal(np.all(got.reshape(len(got), -1) == 0, axis=1), ref_zero)
            zeros_seen += int(ref_zero.sum())
        np.testing.assert_array_equal(ops.to_numpy(h.weight("fc")), w["fc"])  # not managed: untouched here
    zero = {n: np.all(ops.to_numpy(h.weight(n)).reshape(len(w[n]), -1) == 0, axis=1) for n in ("a", "b", "c")}
    # filters alone: each small filter goes; channels jointly: a[3] stays because b[3] is large
    expected_a = [0, 3] if coupling == "filter" else [0]
    assert list(np.flatnonzero(zero["a"])) == expected_a and list(np.flatnonzero(zero["b"])) == [0]
    assert list(np.flatnonzero(zero["c"])) == [2] and zeros_seen > 0
    assert algo.lam == pytest.approx(grda_lambda(c, mu, lr, 5), rel=1e-12)


def test_channel_under_threshold_is_exactly_zero(neutral_ops):
    ops = neutral_ops
    acc = np.ones((4, 2, 3, 3), np.float32)
    acc[1] *= 1e-3          # norm 0.0042 < lam * sqrt(18) = 0.0424
    acc[2] = 0.0            # a zero accumulator gives zero, not NaN
    acc[3] = 0.0
    acc[3, 0, 0, 0] = 0.1   # only one entry: norm 0.1 > 0.0424, kept and shrunk
    out = ops.to_numpy(group_soft_threshold(ops, [ops.asarray(acc)], 0.01)[0])
    assert np.all(out[1] == 0) and np.all(out[2] == 0) and np.all(np.isfinite(out))
    t = 0.01 * math.sqrt(18)
    np.testing.assert_allclose(out[0], acc[0] * (1 - t / math.sqrt(18)), rtol=1e-6)
    np.testing.assert_allclose(out[3, 0, 0, 0], 0.1 - t, rtol=1e-5)


# ---------------------------------------------------------------------------- real data
C_REAL = 0.065   # large enough that 40 steps of 64 MNIST images zero filters; fc1 left to SGD
STEPS = 40


def _mnist():
    return data.load_dataset("mnist", train_limit=512, test_limit=512)


def _batches(ds, epoch):
    return data.batches(ds.x_train, ds.y_train, 64, seed=0, epoch=epoch, mean=ds.mean, std=ds.std)


def _accuracy(handle, ds):
    hits = 0
    for x, y in data.batches(ds.x_test, ds.y_test, 256, seed=0, epoch=0, shuffle=False, drop_last=False,
                             mean=ds.mean, std=ds.std):
        hits += int((handle.predict(x).argmax(1) == y).sum())
    return hits / len(ds.y_test)


def test_structured_sparsity_grows_on_real_data_and_compacts_exactly(backend):
    ds = _mnist()
    h = backend.model_handle("mnist_cnn", ds.num_classes, ds.in_channels, ds.image_size, seed=0)
    algo = SDPrunPruner(SDPrunConfig(c=C_REAL, mu=0.51, lr=0.1, exclude=("fc1",)))
    ov = algo.trainer_overrides()
    tr = backend.Trainer(h, algo, ov["optimizer"], ov["lr"], ov["momentum"], ov["weight_decay"],
                         total_steps=STEPS, lr_schedule=ov["lr_schedule"])
    assert [l.name for l in algo.layers] == ["conv1", "conv2"]
    sparsity, t0 = [], time.perf_counter()
    for epoch in range(STEPS // 8):
        for x, y in _batches(ds, epoch):
            tr.train_step(x, y)
        sparsity.append(algo.current_sparsity)
    seconds = time.perf_counter() - t0
    acc_thresholded = _accuracy(h, ds)
    tr.finish()
    acc_pruned = _accuracy(h, ds)
    s = algo.summary
    print(f"\n[{backend.name}] {STEPS} steps in {seconds:.1f}s; zero-filter weight fraction per epoch "
          f"{[round(v, 3) for v in sparsity]}; filters zero {s['zero_filters']}/{s['filters']}, channels removed "
          f"{s['channels_removed']}/{s['channels']}; test accuracy thresholded {acc_thresholded:.3f}, "
          f"channel-pruned {acc_pruned:.3f}")
    assert sparsity[0] == 0.0 and all(b >= a for a, b in zip(sparsity, sparsity[1:]))
    assert sparsity[-1] > 0.2 and s["channels_removed"] > 0
    assert acc_pruned > 0.3  # far above chance (0.1): pruned, not collapsed
    # channel_keep is the channels nonzero in every producer; the masked model equals the compacted one
    for l in algo.layers:
        w = h.ops.to_numpy(h.weight(l.name))
        np.testing.assert_array_equal(algo.channel_keep[l.name], np.flatnonzero(np.any(w.reshape(len(w), -1) != 0, 1)))
    small = backend.compact(h, algo.channel_keep)
    x = next(iter(data.batches(ds.x_test, ds.y_test, 64, seed=0, epoch=0, shuffle=False, mean=ds.mean, std=ds.std)))[0]
    np.testing.assert_allclose(small.predict(x), h.predict(x), rtol=1e-4, atol=1e-4)
    assert sum(l.numel for l in small.layers) < sum(l.numel for l in h.layers)
    assert algo.plan().kept_channels["conv1"] == [int(i) for i in algo.channel_keep["conv1"]]


# ---------------------------------------------------------------------------- native optimizers
def _plain_batches(ds, n):
    out = []
    for x, y in _batches(ds, 0):
        out.append((x, y))
        if len(out) == n:
            return out


def test_torch_optimizer_matches_neutral_path():
    torch = pytest.importorskip("torch")
    import prunekit.backends.torch as tb
    from prunekit.backends.torch.optimizers import SDPrun

    ds = data.load_dataset("mnist", train_limit=256, test_limit=16)
    h1 = tb.model_handle("mnist_cnn", 10, 1, 28, seed=3)
    h2 = tb.model_handle("mnist_cnn", 10, 1, 28, seed=3)
    algo = SDPrunPruner(SDPrunConfig(c=0.05, mu=0.51, lr=0.1))
    tr = tb.Trainer(h1, algo, "sgd", 0.1, 0.0, 0.0, total_steps=4, lr_schedule="constant")
    opt = SDPrun(SDPrun.param_groups_for(h2), lr=0.1, c=0.05, mu=0.51)
    for x, y in _plain_batches(ds, 4):
        tr.train_step(x, y)
        h2.model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(h2.model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    s1, s2 = h1.state_numpy(), h2.state_numpy()
    for k in s1:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    zero = np.all(s1["conv1.weight"].reshape(32, -1) == 0, 1)
    assert np.array_equal(zero, np.all(s2["conv1.weight"].reshape(32, -1) == 0, 1))


def test_torch_optimizer_joint_group_and_default_selection():
    torch = pytest.importorskip("torch")
    from prunekit.backends.torch.optimizers import SDPrun

    r = np.random.default_rng(0)
    a = torch.nn.Parameter(torch.from_numpy(r.standard_normal((5, 4)).astype(np.float32)))
    b = torch.nn.Parameter(torch.from_numpy(r.standard_normal((5, 2, 3, 3)).astype(np.float32)))
    bias = torch.nn.Parameter(torch.zeros(5))
    opt = SDPrun([{"params": [a, b], "grda": True, "joint": True}, {"params": [bias]}], lr=0.1, c=0.3, mu=0.6)
    ga, gb, gbias = (r.standard_normal(t.shape).astype(np.float32) for t in (a, b, bias))
    A0, B0 = a.detach().numpy().copy(), b.detach().numpy().copy()
    a.grad, b.grad, bias.grad = torch.from_numpy(ga), torch.from_numpy(gb), torch.from_numpy(gbias)
    opt.step()
    ref = numpy_reference({"a": A0, "b": B0}, [{"a": ga, "b": gb}], [("a", "b")], 0.3, 0.6, 0.1)[0]
    np.testing.assert_allclose(a.detach().numpy(), ref["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), ref["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias.detach().numpy(), -0.1 * gbias, rtol=1e-6)  # 1-D: plain SGD by default
    with pytest.raises(ConfigError):
        SDPrun([a], mu=0.4)


@pytest.mark.parametrize("update_on", ["device", "host"])
def test_mindspore_optimizer_matches_neutral_path(update_on):
    ms = pytest.importorskip("mindspore")
    import prunekit.backends.mindspore as mb
    import mindspore.ops as msops
    from prunekit.backends.mindspore.optimizers import SDPrun

    ds = data.load_dataset("mnist", train_limit=256, test_limit=16)
    h1 = mb.model_handle("mnist_cnn", 10, 1, 28, seed=3)
    h2 = mb.model_handle("mnist_cnn", 10, 1, 28, seed=3)
    algo = SDPrunPruner(SDPrunConfig(c=0.05, mu=0.51, lr=0.1))
    tr = mb.Trainer(h1, algo, "sgd", 0.1, 0.0, 0.0, total_steps=3, lr_schedule="constant")
    opt = SDPrun.from_handle(h2, learning_rate=0.1, c=0.05, mu=0.51, update_on=update_on)
    grad_fn = ms.value_and_grad(lambda x, y: msops.cross_entropy(h2.model(x), y), None, opt.parameters)
    h2.model.set_train(True)
    for x, y in _plain_batches(ds, 3):
        tr.train_step(x, y)
        _, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype(np.int32)))
        opt(grads)
    s1, s2 = h1.state_numpy(), h2.state_numpy()
    for k in s1:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert opt.lam == pytest.approx(algo.lam, rel=1e-12)
    np.testing.assert_allclose(opt.accumulator(h2.module("conv1").weight).asnumpy(),
                               algo.uops.to_numpy(algo.acc["conv1"]), rtol=1e-5, atol=1e-6)


def test_removed_channels_take_their_batchnorm_with_them(backend):
    """A zero filter followed by BN still outputs BN's shift: finish() zeroes the BN scale and
    shift of removed channels, so the masked model equals the compacted (narrower) one."""
    h = backend.model_handle("resnet20", 10, 3, 32, seed=1)
    r = np.random.default_rng(2)
    state = h.state_numpy()
    for k, v in state.items():
        if k.endswith(("bias", "running_mean")) and "bn" in k:
            state[k] = (0.5 * r.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith("running_var"):
            state[k] = r.uniform(0.5, 2.0, v.shape).astype(np.float32)
    h.load_state_numpy(state)
    algo = SDPrunPruner(SDPrunConfig(c=1e-3, mu=0.51, lr=0.1)).bind(h, 1)
    ops = h.ops
    assert "layer1.0.conv1" in algo.acc and "layer1.0.conv2" not in algo.acc  # residual stream: not prunable
    killed = {"layer1.0.conv1": [0, 3], "layer2.1.conv1": [5]}
    for name, rows in killed.items():
        a = algo.uops.to_numpy(algo.acc[name])
        a[rows] = 0.0
        algo.acc[name] = algo.uops.asarray(a)
    algo.step_with({n: ops.zeros_like(ops.asarray(ops.to_numpy(h.weight(n)))) for n in algo.acc})
    x = r.standard_normal((4, 3, 32, 32)).astype(np.float32)
    thresholded = h.predict(x)
    algo.finish()
    masked = h.predict(x)
    assert np.abs(masked - thresholded).max() > 1e-3  # the BN shifts did reach the logits
    for name, rows in killed.items():
        assert not set(rows) & set(algo.channel_keep[name].tolist())
        assert len(algo.channel_keep[name]) == h.layer(name).out_channels - len(rows)
    small = backend.compact(h, algo.channel_keep)
    np.testing.assert_allclose(small.predict(x), masked, rtol=1e-4, atol=1e-4)
    assert small.layer("layer1.0.conv1").out_channels == 14
