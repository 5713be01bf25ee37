"""Gradual magnitude pruning (prunekit/algorithms/magnitude.py) on the PyTorch backend: measured
sparsity against the target, channel pruning, exclusions, the schedule seen during training,
and configuration errors."""

import numpy as np
import pytest

from prunekit.algorithms import PLANNED, make_algorithm
from prunekit.algorithms.magnitude import MagnitudePruner
from prunekit.errors import ConfigError
from references import keep, ref_topk

torch = pytest.importorskip("torch")
from prunekit.backends.torch import Trainer, model_handle  # noqa: E402




# ---------------------------------------------------------------- helpers (independent of prunekit)
def mnist(seed=0):
    return model_handle("mnist_cnn", in_channels=1, image_size=28, seed=seed)


def weights(h):
    return {l.name: h.ops.to_numpy(h.weight(l.name)) for l in h.layers}


def zeros_per_layer(h):
    return {n: int(np.count_nonzero(w == 0)) for n, w in weights(h).items()}


def batches(n, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
            for _ in range(n)]


def oneshot(h, **config):
    alg = make_algorithm("magnitude", schedule="oneshot", **config).bind(h, total_steps=1)
    alg.before_step(0)
    return alg


def channel_norms(w):
    return np.sqrt((w.astype(np.float64) ** 2).reshape(w.shape[0], -1).sum(1))


# ---------------------------------------------------------------- unstructured
def test_global_oneshot_masks_match_numpy_reference():
    h = mnist(1)
    before = weights(h)
    names = [l.name for l in h.layers]
    alg = oneshot(h, sparsity=0.8, scope="global")
    total = sum(w.size for w in before.values())
    expected = ref_topk(np.concatenate([np.abs(before[n]).reshape(-1) for n in names]), keep(total, 0.8))
    start = 0
    after = weights(h)
    for n in names:
        size = before[n].size
        want = expected[start:start + size].reshape(before[n].shape)
        start += size
        np.testing.assert_array_equal(h.ops.to_numpy(alg.masks[n]) > 0.5, want, err_msg=n)
        np.testing.assert_array_equal(after[n], np.where(want, before[n], 0), err_msg=n)
    # one global threshold: layers end up with different sparsities
    per_layer = [np.mean(after[n] == 0) for n in names]
    assert max(per_layer) - min(per_layer) > 0.05


def test_global_run_reaches_target_with_cubic_progression():
    steps, target = 40, 0.9
    h = mnist(2)
    alg = make_algorithm("magnitude", sparsity=target, scope="global", schedule="cubic", frequency=5, end_fraction=0.75)
    trainer = Trainer(h, alg, optimizer="sgd", lr=0.02, total_steps=steps, lr_schedule="constant")
    sched = alg.schedule
    assert sched.begin_step == 0 and abs(sched.end_step - 0.75 * steps) <= 1.5
    t0, t_end = sched.begin_step, sched.end_step
    total = sum(l.numel for l in h.layers)
    data = batches(8)
    observed, updates = [], []
    for t in range(steps):
        trainer.train_step(*data[t % len(data)])
        observed.append(sum(zeros_per_layer(h).values()))
        if sched.is_update_step(t):
            updates.append(t)
            # Zhu & Gupta with s_i = 0: s_t = s_f (1 - (1 - (t - t0) / (t_end - t0))^3)
            s_t = target * (1 - (1 - (t - t0) / (t_end - t0)) ** 3)
            assert observed[-1] == total - keep(total, s_t), t
    trainer.finish()
    assert updates[0] == 0 and updates[-1] == t_end and len(updates) >= 6
    assert all(b >= a for a, b in zip(observed, observed[1:]))          # never decreases
    assert observed[updates[1]] > observed[0] and observed[updates[-1]] > observed[updates[-2]]
    assert observed[-1] == total - keep(total, target)                  # exactly the target, measured
    assert sum(zeros_per_layer(h).values()) == total - keep(total, target)


def test_exponential_schedule_during_training():
    steps, target = 30, 0.96
    h = mnist(3)
    alg = make_algorithm("magnitude", sparsity=target, schedule="exponential", frequency=5, end_fraction=0.7)
    trainer = Trainer(h, alg, optimizer="sgd", lr=0.02, total_steps=steps, lr_schedule="constant")
    sched = alg.schedule
    total = sum(l.numel for l in h.layers)
    n_updates = -(-(sched.end_step - sched.begin_step) // sched.frequency)
    data = batches(4, seed=3)
    for t in range(steps):
        trainer.train_step(*data[t % len(data)])
        if sched.is_update_step(t) and t < sched.end_step:
            u = (t - sched.begin_step) // sched.frequency
            density = (1 - target) ** (u / n_updates)
            assert sum(zeros_per_layer(h).values()) == total - keep(total, 1 - density), t
    trainer.finish()
    assert sum(zeros_per_layer(h).values()) == total - keep(total, target)


def test_layer_scope_prunes_every_layer_to_target():
    for target in (0.5, 0.9, 0.97):
        h = mnist(4)
        oneshot(h, sparsity=target, scope="layer")
        for l in h.layers:
            assert zeros_per_layer(h)[l.name] == l.numel - keep(l.numel, target), (l.name, target)
    # and after training with a gradual schedule
    h = mnist(5)
    alg = make_algorithm("magnitude", sparsity=0.8, scope="layer", frequency=3, end_fraction=0.5)
    trainer = Trainer(h, alg, optimizer="adam", lr=1e-3, total_steps=20, lr_schedule="constant")
    for x, y in batches(20, seed=5):
        trainer.train_step(x, y)
    trainer.finish()
    zeros = zeros_per_layer(h)
    for l in h.layers:
        assert zeros[l.name] == l.numel - keep(l.numel, 0.8), l.name


def test_finish_enforces_target_when_training_stops_early():
    h = mnist(6)
    alg = make_algorithm("magnitude", sparsity=0.75, frequency=10, end_fraction=0.8)
    trainer = Trainer(h, alg, optimizer="sgd", lr=0.01, total_steps=1000, lr_schedule="constant")
    for x, y in batches(12, seed=6):
        trainer.train_step(x, y)
    total = sum(l.numel for l in h.layers)
    assert sum(zeros_per_layer(h).values()) < total - keep(total, 0.75)   # mid-schedule
    trainer.finish()
    assert sum(zeros_per_layer(h).values()) == total - keep(total, 0.75)


# ---------------------------------------------------------------- channels
def _channel_state(w):
    """Per output channel: True if kept; asserts every channel is all-zero or all-nonzero."""
    rows = w.reshape(w.shape[0], -1)
    zero = np.all(rows == 0, axis=1)
    assert np.all(zero | np.all(rows != 0, axis=1)), "a channel is only partly pruned"
    return ~zero


@pytest.mark.parametrize("target", [0.3, 0.75, 0.97])
def test_channel_layer_scope(target):
    h = mnist(7)
    before = weights(h)
    oneshot(h, sparsity=target, granularity="channel", scope="layer")
    after = weights(h)
    for l in h.layers:
        kept = _channel_state(after[l.name])
        c = l.weight_shape[0]
        assert kept.sum() == max(1, keep(c, target)), l.name       # at least one channel per layer
        np.testing.assert_array_equal(kept, ref_topk(channel_norms(before[l.name]), max(1, keep(c, target))))
        np.testing.assert_array_equal(after[l.name][kept], before[l.name][kept])


def test_channel_global_scope_uses_rms_and_keeps_one_per_layer():
    target = 0.5
    h = mnist(8)
    # make fc2's channels the weakest by far: one global threshold would empty the layer
    h.set_weight("fc2", h.weight("fc2") * 1e-3)
    before = weights(h)
    names = [l.name for l in h.layers]
    alg = oneshot(h, sparsity=target, granularity="channel", scope="global")
    after = weights(h)
    rms = {n: channel_norms(before[n]) / np.sqrt(before[n][0].size) for n in names}
    total = sum(v.size for v in rms.values())
    flat = ref_topk(np.concatenate([rms[n] for n in names]), keep(total, target))
    start, kept_total = 0, 0
    for n in names:
        want = flat[start:start + rms[n].size]
        start += rms[n].size
        if not want.any():                                  # emptied: its best channel survives
            want = np.zeros_like(want)
            want[np.argmax(rms[n])] = True
        kept = _channel_state(after[n])
        np.testing.assert_array_equal(kept, want, err_msg=n)
        kept_total += kept.sum()
    assert _channel_state(after["fc2"]).sum() == 1
    assert kept_total == keep(total, target) + 1
    assert set(alg.masks) == set(names)


# ---------------------------------------------------------------- exclusions and errors
def test_exclude_leaves_layer_dense():
    h = mnist(9)
    before = weights(h)
    oneshot(h, sparsity=0.9, exclude=("conv1", "fc2"))
    after = weights(h)
    np.testing.assert_array_equal(after["conv1"], before["conv1"])
    np.testing.assert_array_equal(after["fc2"], before["fc2"])
    rest = [l for l in h.layers if l.name not in ("conv1", "fc2")]
    total = sum(l.numel for l in rest)
    assert sum(zeros_per_layer(h)[l.name] for l in rest) == total - keep(total, 0.9)


def test_exclude_unknown_layer():
    h = mnist(10)
    before = weights(h)
    alg = make_algorithm("magnitude", sparsity=0.5, exclude=("conv1", "no_such_layer"))
    with pytest.raises(ConfigError, match="no_such_layer"):
        alg.bind(h, total_steps=10)
    for n, w in weights(h).items():
        np.testing.assert_array_equal(w, before[n])


def test_make_algorithm_errors():
    with pytest.raises(ConfigError, match="bogus_pruner"):
        make_algorithm("bogus_pruner")
    for name in PLANNED:   # planned but not implemented: still a clear ConfigError
        with pytest.raises(ConfigError, match=name):
            make_algorithm(name)
    assert isinstance(make_algorithm("MAGNITUDE", sparsity=0.5), MagnitudePruner)
    for bad in (1.5, -0.1, 1.0, float("nan"), "abc"):
        with pytest.raises(ConfigError):
            make_algorithm("magnitude", sparsity=bad)
    with pytest.raises(ConfigError, match="1.5"):
        make_algorithm("magnitude", sparsity=1.5)
    with pytest.raises(ConfigError, match="block"):
        make_algorithm("magnitude", granularity="block")
    with pytest.raises(ConfigError, match="everywhere"):
        make_algorithm("magnitude", scope="everywhere")
    with pytest.raises(ConfigError):
        make_algorithm("magnitude", begin_fraction=0.8, end_fraction=0.5)
    with pytest.raises(ConfigError, match="quadratic"):
        make_algorithm("magnitude", schedule="quadratic").bind(mnist(0), total_steps=10)


def test_state_dict_restores_masks_on_a_fresh_model():
    h = mnist(11)
    alg = oneshot(h, sparsity=0.7)
    state = alg.state_dict()
    fresh = mnist(11)
    alg2 = make_algorithm("magnitude", sparsity=0.7, schedule="oneshot").bind(fresh, total_steps=1)
    alg2.load_state_dict(state)
    assert alg2.masks_changed
    a, b = weights(h), weights(fresh)
    for n in a:
        np.testing.assert_array_equal(b[n], a[n])
