"""DSA (differentiable sparsity allocation): the β₁ root, the implicit α gradient, the quadratic
FLOPs model against counted FLOPs of compacted models, the budget projection, the final
rounding into the budget window, the channel gates, and short real-data runs on both backends."""
import time

import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.dsa import (DSAConfig, DSAPruner, P_FLOOR, alpha_gradient, final_counts,
                                     keep_probabilities, project_to_budget, solve_log_beta1, top_channels)
from prunekit.decisions.channel_flops import ChannelFlops
from prunekit.decisions.channel_groups import find_channel_groups
from prunekit.errors import ConfigError
from prunekit.decisions.flops import count_model


def _measured_macs(handle) -> int:
    return count_model(handle.layers, handle.weights_numpy(), handle.state_numpy())["dense_macs"]


# ----------------------------------------------------------------------------- the pruning op
@pytest.mark.parametrize("alpha", [0.02, 0.1, 0.37, 0.5, 0.9, 0.993, 1.0])
def test_beta1_root_gives_mean_p_alpha(alpha):
    r = np.random.default_rng(0)
    for spread in (0.01, 1.0, 5.0):  # nearly equal, typical, and widely spread |γ|
        log_b = np.log(np.abs(r.standard_normal(64)) * spread + 1e-3)
        t = solve_log_beta1(log_b, alpha)
        p, ds = keep_probabilities(log_b, t)
        assert abs(p.mean() - alpha) < 1e-9, (spread, p.mean())
        assert np.all(p >= P_FLOOR) and np.all(p <= 1.0)
        assert np.all(ds[p >= 1.0] == 0.0)  # capped entries do not move with β₁
        # more important channels are kept with (weakly) higher probability
        order = np.argsort(log_b)
        assert np.all(np.diff(p[order]) >= -1e-12)


def test_beta1_root_rejects_unreachable_ratio():
    with pytest.raises(ConfigError, match="keep ratio"):
        solve_log_beta1(np.zeros(4), P_FLOOR)
    with pytest.raises(ConfigError, match="keep ratio"):
        solve_log_beta1(np.zeros(4), 1.2)


def test_implicit_gradient_equals_finite_difference():
    """∂L/∂α from the implicit formula equals a central difference of L(p(α)) with β₁ re-solved,
    for a tiny model whose input channels are scaled by the expected mask p."""
    r = np.random.default_rng(1)
    C = 12
    log_b = np.log(np.abs(r.standard_normal(C)) + 0.05)
    h = r.standard_normal((C, 5))          # channel activations
    W = r.standard_normal((3, C))          # next layer
    target = r.standard_normal((3, 5))

    def loss(p):
        return float(np.sum((W @ (p[:, None] * h) - target) ** 2))

    def grad_p(p):
        resid = W @ (p[:, None] * h) - target
        return np.sum((W.T @ (2 * resid)) * h, axis=1)

    for alpha in (0.3, 0.55, 0.8):
        t = solve_log_beta1(log_b, alpha)
        p, ds = keep_probabilities(log_b, t)
        implicit = alpha_gradient(grad_p(p), ds)
        eps = 1e-5
        lp = loss(keep_probabilities(log_b, solve_log_beta1(log_b, alpha + eps))[0])
        lm = loss(keep_probabilities(log_b, solve_log_beta1(log_b, alpha - eps))[0])
        fd = (lp - lm) / (2 * eps)
        assert implicit == pytest.approx(fd, rel=1e-5, abs=1e-7), (alpha, implicit, fd)


def test_top_channels_tie_rule():
    b = np.array([0.5, 2.0, 0.5, 2.0, 1.0])
    assert top_channels(b, 3).tolist() == [1, 3, 4]
    assert top_channels(b, 4).tolist() == [0, 1, 3, 4]  # of the tied 0.5s, the lower index


# ----------------------------------------------------------------------------- FLOPs model
def _integer_ratios(groups, r):
    return {g.name: int(r.integers(1, g.size + 1)) for g in groups if g.prunable}


@pytest.mark.parametrize("model", ["resnet20", "vgg16", "mobilenetv2"])
def test_flops_model_equals_counted_flops(backend, model):
    if backend.name == "mindspore" and model != "resnet20":
        pytest.skip("one model on MindSpore keeps the test short (the FLOPs model is neutral)")
    handle = backend.model_handle(model, seed=0)
    groups = find_channel_groups(handle)
    fm = ChannelFlops(groups, handle.layers)
    assert fm.dense_flops() == _measured_macs(handle)
    r = np.random.default_rng(3)
    for _ in range(2):
        counts = _integer_ratios(groups, r)
        keep = {n: np.sort(r.choice(fm.sizes[fm.names.index(n)], k, replace=False)) for n, k in counts.items()}
        new = backend.compact(handle, keep)
        alpha = fm.full_ratios({n: k / fm.sizes[fm.names.index(n)] for n, k in counts.items()})
        assert fm.flops(alpha) == pytest.approx(_measured_macs(new), rel=1e-12, abs=1e-6)
    # the gradient is the derivative of F
    a = fm.full_ratios(r.uniform(0.2, 1.0, len(groups)))
    d = r.standard_normal(len(groups)) * fm.prunable
    eps = 1e-6
    fd = (fm.flops(a + eps * d) - fm.flops(a - eps * d)) / (2 * eps)
    assert fm.gradient(a) @ d == pytest.approx(fd, rel=1e-6)


# ----------------------------------------------------------------------------- budget
def _vgg_model(backend_name="torch"):
    from prunekit.contract.backend import get_backend
    handle = get_backend(backend_name).model_handle("vgg16", seed=0)
    groups = find_channel_groups(handle)
    return handle, groups, ChannelFlops(groups, handle.layers)


@pytest.fixture(scope="module")
def vgg_torch():
    pytest.importorskip("torch")
    return _vgg_model("torch")


def test_budget_projection_lands_within_budget(vgg_torch):
    _, groups, fm = vgg_torch
    searchable = fm.prunable
    lo = np.where(searchable, 0.05, 1.0)
    hi = np.where(searchable, 1 - 1e-4, 1.0)
    r = np.random.default_rng(4)
    dense = fm.dense_flops()
    for budget in (0.05, 0.3, 0.5, 0.75):
        B = budget * dense
        for _ in range(3):
            tilde = np.where(searchable, r.uniform(0.3, 1.0, len(groups)), 1.0)
            alpha, lam = project_to_budget(fm, tilde, B, lo, hi)
            assert fm.flops(alpha) <= B
            assert np.all(alpha >= lo) and np.all(alpha <= hi)
            if fm.flops(tilde) > B:  # an infeasible point lands on the boundary
                assert fm.flops(alpha) >= B * (1 - 1e-9)
                assert lam > 0
                assert np.all(alpha <= tilde + 1e-15)  # ratios only go down
            else:
                assert np.array_equal(alpha, tilde) and lam == 0.0
    with pytest.raises(ConfigError, match="budget"):
        project_to_budget(fm, np.ones(len(groups)), 0.001 * dense, lo, hi)


def test_final_counts_within_two_percent_below_budget(vgg_torch):
    handle, groups, fm = vgg_torch
    r = np.random.default_rng(5)
    searchable = fm.prunable
    for budget in (0.05, 0.3, 0.5):
        B = budget * fm.dense_flops()
        tilde = np.where(searchable, r.uniform(0.2, 1.0, len(groups)), 1.0)
        alpha, _ = project_to_budget(fm, tilde, B, np.where(searchable, 0.02, 1.0), np.ones(len(groups)))
        for a in (alpha, alpha * 0.7):  # on the budget, and well under it (the fill must reach the window)
            a = np.where(searchable, np.maximum(a, 0.02), 1.0)
            counts = final_counts(fm, a, B, searchable, 0.02)
            flops = fm.flops_of_counts(counts)
            assert 0.98 * B <= flops <= B, (budget, flops / B)
    # measured on the compacted model once (the FLOPs model is exact at integer counts)
    keep = {g.name: np.arange(int(k)) for g, k in zip(groups, counts) if g.prunable}
    from prunekit.contract.backend import get_backend
    new = get_backend("torch").compact(handle, keep)
    assert 0.98 * B <= _measured_macs(new) <= B


# ----------------------------------------------------------------------------- config
def test_config_errors_are_clear():
    for bad in ({"budget": 0.0}, {"budget": 1.5}, {"budget": "half"}, {"arch_optimizer": "rmsprop"},
                {"arch_every": 0}, {"min_ratio": 0.005}, {"val_fraction": 1.0}):
        with pytest.raises(ConfigError, match="dsa"):
            DSAConfig(**bad)
    assert isinstance(make_algorithm("dsa", config=DSAConfig(budget=0.3)), DSAPruner)


def test_arch_step_without_held_out_data_fails_clearly(backend):
    handle = backend.model_handle("resnet20", seed=0)
    algo = DSAPruner(DSAConfig(budget=0.5))
    algo.bind(handle, total_steps=10)
    try:
        with pytest.raises(ConfigError, match="held-out"):
            algo.before_step(0)
    finally:
        algo.gates.remove()


# ----------------------------------------------------------------------------- gates
def test_gates_mask_channels_and_leave_the_optimizer_alone(backend):
    """A gate of 0 on a group's BNs equals zeroing those BNs' scale and shift; gates are no model
    parameters; removing them restores the model."""
    handle = backend.model_handle("resnet20", seed=0)
    groups = [g for g in find_channel_groups(handle) if g.prunable and g.norms]
    state = handle.state_numpy()
    params_before = len(handle.parameters_by_name())
    x = np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32)
    dense_out = handle.predict(x)
    gates = backend.channel_gates(handle, {g.name: (g.norms, g.size) for g in groups})
    masks = {g.name: (np.arange(g.size) % 3 != 0).astype(np.float32) for g in groups}
    gates.set(masks)
    gated_out = handle.predict(x)
    assert len(handle.parameters_by_name()) == params_before
    assert sorted(handle.state_numpy()) == sorted(state)
    gates.remove()
    np.testing.assert_allclose(handle.predict(x), dense_out, rtol=1e-5, atol=1e-5)
    folded = dict(state)
    for g in groups:
        for bn in g.norms:
            for leaf in ("weight", "bias"):
                folded[f"{bn}.{leaf}"] = state[f"{bn}.{leaf}"] * masks[g.name]
    handle.load_state_numpy(folded)
    np.testing.assert_allclose(gated_out, handle.predict(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- real data
def _cycle(x, y, ds, batch, seed):
    from prunekit.app import data
    epoch = 0
    while True:
        yield from data.batches(x, y, batch, seed=seed, epoch=epoch, augment=False, mean=ds.mean, std=ds.std)
        epoch += 1


def test_short_cifar_run_ends_within_budget_after_compaction(backend):
    """ResNet-20 on a small CIFAR-10 subset: 90 % for the weights, 10 % for α, a few steps of
    search then fine-tuning at fixed channels; the compacted model's measured FLOPs lie within
    2 % below the budget, and it computes what the pruned (gated) model computes."""
    from prunekit.app import data

    t0 = time.perf_counter()
    ds = data.load_dataset("cifar10", train_limit=320, test_limit=10)
    x_tr, y_tr, x_val, y_val = data.split_train_val(ds.x_train, ds.y_train, 0.1, seed=0)
    assert len(y_val) == 32 and len(y_tr) == 288
    handle = backend.model_handle("resnet20", ds.num_classes, ds.in_channels, ds.image_size, seed=0)
    steps = 6
    algo = DSAPruner(DSAConfig(budget=0.5, end_fraction=0.5, arch_lr=0.1))
    trainer = backend.Trainer(handle, algo, "sgd", 0.02, 0.9, 5e-4, total_steps=steps, lr_schedule="constant")
    algo.validation = _cycle(x_val, y_val, ds, 16, seed=1)
    alphas = [algo.alpha.copy()]
    for step, (x, y) in zip(range(steps), _cycle(x_tr, y_tr, ds, 32, seed=0)):
        loss = float(trainer.train_step(x, y))
        assert np.isfinite(loss)
        alphas.append(algo.alpha.copy())
        assert algo.flops_model.flops(algo.alpha) <= algo.budget_flops * (1 + 1e-12)
    trainer.finish()
    assert len(algo.history) == 3  # α steps during the search (first half), none after
    assert not np.array_equal(alphas[1], alphas[3])  # the α steps moved the ratios
    B = 0.5 * _measured_macs(handle)
    keep = algo.channel_keep
    assert set(keep) == {g.name for g in algo.groups if g.prunable and g.norms}
    new = backend.compact(handle, keep)
    measured = _measured_macs(new)
    assert 0.98 * B <= measured <= B, measured / B
    assert measured == algo.final_flops
    xt = next(iter(data.batches(ds.x_test, ds.y_test, 4, shuffle=False, mean=ds.mean, std=ds.std)))[0]
    np.testing.assert_allclose(new.predict(xt), handle.predict(xt), rtol=1e-4, atol=1e-4)
    plan = algo.plan()
    assert plan.kept_channels == {k: v.tolist() for k, v in keep.items()}
    assert set(plan.keep_ratios) == set(keep)
    print(f"{backend.name}: DSA run {time.perf_counter() - t0:.1f} s, FLOPs {measured / (2 * B):.4f} of dense")


def test_job_runs_dsa_and_reports_the_compacted_model(tmp_path):
    """``prunekit run --algorithm dsa --set budget=0.5``: 10 % of the training images held out for
    α, the compacted model measured within 2 % below the budget, the plan holds the channels."""
    pytest.importorskip("torch")
    from prunekit.app.job import RunConfig, run
    from prunekit.decisions.plan import PruningPlan

    cfg = RunConfig(backend="torch", model="resnet20", algorithm="dsa", params={"budget": 0.5}, dense_epochs=0,
                    prune_epochs=1, batch_size=32, train_limit=200, test_limit=50, augment=False, progress=False,
                    out=str(tmp_path / "run"))
    report = run(cfg, echo=lambda *a: None)
    assert report["run"]["train_images"] == 180  # 20 of 200 held out for the α steps
    section = report["compaction"]
    assert 0.98 * 0.5 <= section["macs_after"] / section["macs_before"] <= 0.5
    assert "after_compaction" in report["accuracy"]
    plan = PruningPlan.load(str(tmp_path / "run" / "plan"))
    assert plan.algorithm == "dsa" and plan.kept_channels
    assert {k: len(v) for k, v in plan.kept_channels.items()} == {k: v["kept"] for k, v in section["groups"].items()}
    with pytest.raises(ConfigError, match="budget"):
        RunConfig(algorithm="dsa", params={"budget": 2.0}).validate()


# ----------------------------------------------------------------------------- a BN over a concatenation
def _concat_net(backend_name):
    """Two conv+BN branches concatenated and normalised by one BN (like DenseNet's), then a conv
    and a classifier: the concatenation's BN holds two channel groups, at offsets 0 and 4."""
    if backend_name == "torch":
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
                self.conv_b, self.bn_b = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
                self.bn_c = nn.BatchNorm2d(10)
                self.conv_c, self.bn_d = nn.Conv2d(10, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                y = torch.cat([torch.relu(self.bn_a(self.conv_a(x))), torch.relu(self.bn_b(self.conv_b(x)))], 1)
                y = torch.relu(self.bn_d(self.conv_c(torch.relu(self.bn_c(y)))))
                return self.fc(y.mean(dim=(2, 3)))

        torch.manual_seed(0)
        return Net().eval()
    import mindspore as ms
    from mindspore import nn, ops

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, pad_mode="same"), nn.BatchNorm2d(4)
            self.conv_b, self.bn_b = nn.Conv2d(3, 6, 3, pad_mode="same"), nn.BatchNorm2d(6)
            self.bn_c = nn.BatchNorm2d(10)
            self.conv_c, self.bn_d = nn.Conv2d(10, 8, 3, pad_mode="same"), nn.BatchNorm2d(8)
            self.fc = nn.Dense(8, 10)
            self.relu = nn.ReLU()

        def construct(self, x):
            y = ops.concat((self.relu(self.bn_a(self.conv_a(x))), self.relu(self.bn_b(self.conv_b(x)))), 1)
            y = self.relu(self.bn_d(self.conv_c(self.relu(self.bn_c(y)))))
            return self.fc(y.mean(axis=(2, 3)))

    ms.set_seed(0)
    net = Net()
    net.set_train(False)
    return net


def test_gates_on_a_bn_over_a_concatenation(backend):
    """Each group's gate sits at its offset in the concatenation's BN: gating equals zeroing the
    BN scale and shift at those channels, a group's gradient sums its slices over its BNs, and DSA
    runs, folds and compacts into a model that computes what the gated model computes."""
    handle = backend.wrap(_concat_net(backend.name), (3, 8, 8), "concat_net")
    state = handle.state_numpy()
    r = np.random.default_rng(3)
    for bn in ("bn_a", "bn_b", "bn_c", "bn_d"):  # scales and shifts away from (1, 0)
        for leaf, base in (("weight", 0.5), ("bias", -0.2)):
            key = f"{bn}.{leaf}"
            state[key] = (base + r.random(state[key].shape)).astype(np.float32)
    handle.load_state_numpy(state)
    groups = [g for g in find_channel_groups(handle) if g.prunable and g.norms]
    by_norm = {(bn, g.in_offsets.get(bn, 0)): g.name for g in groups for bn in g.norms}
    assert {k for k in by_norm if k[0] == "bn_c"} == {("bn_c", 0), ("bn_c", 4)}
    x = r.standard_normal((2, 3, 8, 8)).astype(np.float32)
    gates = backend.channel_gates(handle, {g.name: (g.norms, g.size, {bn: g.in_offsets.get(bn, 0) for bn in g.norms})
                                           for g in groups})
    masks = {g.name: (np.arange(g.size) % 2 == 1).astype(np.float32) for g in groups}
    gates.set(masks)
    gated = handle.predict(x)
    _, grads = gates.gradients(x, np.array([1, 2]))
    assert {k: v.shape for k, v in grads.items()} == {g.name: (g.size,) for g in groups}
    assert all(np.abs(v).sum() > 0 for v in grads.values())
    gates.remove()
    folded = dict(state)
    for g in groups:
        for bn in g.norms:
            for leaf in ("weight", "bias"):
                v = folded[f"{bn}.{leaf}"].copy()
                first = g.in_offsets.get(bn, 0)
                v[first:first + g.size] *= masks[g.name]
                folded[f"{bn}.{leaf}"] = v
    handle.load_state_numpy(folded)
    np.testing.assert_allclose(gated, handle.predict(x), rtol=1e-5, atol=1e-5)
    handle.load_state_numpy(state)
    # the whole algorithm: one α step, then fixed channels, folded and compacted
    algo = DSAPruner(DSAConfig(budget=0.5, end_fraction=0.5), groups=groups)
    algo.validation = iter([(x, np.array([1, 2]))] * 4)
    algo.bind(handle, 2)
    algo.before_step(0)
    algo.before_step(1)
    algo.finish()
    keep = algo.channel_keep
    assert any(len(keep[g.name]) < g.size for g in groups)
    small = backend.compact(handle, keep)
    assert small.weights_numpy()["conv_c"].shape[1] == sum(len(keep[g.name]) for g in groups
                                                          if "bn_c" in g.norms)
    np.testing.assert_allclose(small.predict(x), handle.predict(x), rtol=1e-4, atol=1e-4)


def test_norm_gate_layout_assembles_slices_and_refuses_overlaps():
    """One gate per norm from the groups' slices at their offsets (ones elsewhere); a group's
    gradient sums its slices over its norms; overlapping or out-of-range slices are refused."""
    from prunekit.decisions.channel_groups import NormGateLayout
    from prunekit.errors import ModelError

    layout = NormGateLayout({"a": (("n1", "cat"), 2, {"cat": 0}), "b": (("cat",), 3, {"cat": 3})},
                            {"n1": 2, "cat": 7})
    gates = layout.assemble({"a": np.array([0, 1]), "b": np.array([1, 0, 0])})
    np.testing.assert_array_equal(gates["cat"], [0, 1, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(gates["n1"], [0, 1])
    grads = layout.split({"n1": np.array([1.0, 2.0]), "cat": np.arange(7.0)})
    np.testing.assert_array_equal(grads["a"], [1.0, 3.0])
    np.testing.assert_array_equal(grads["b"], [3.0, 4.0, 5.0])
    with pytest.raises(ModelError, match="overlap"):
        NormGateLayout({"a": (("cat",), 4), "b": (("cat",), 3, {"cat": 3})}, {"cat": 7})
    with pytest.raises(ModelError, match="do not fit"):
        NormGateLayout({"b": (("cat",), 3, {"cat": 5})}, {"cat": 7})
