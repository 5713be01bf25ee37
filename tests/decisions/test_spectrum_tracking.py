"""The ``tracked`` rank machinery (prunekit/decisions/spectrum_tracking.py) for RPG and TRP, on every backend.

* Solving every step, it computes what the per-layer ``gram`` path computes: the same ranks, the
  same RPG rank-term gradients and the same TRP projections and nuclear terms (trained ResNet-20).
* At a solve its ranks are full SVD's (float64 NumPy reference) on the trained weights.
* Between solves it reuses the basis: after real SGD steps on real CIFAR-10 data, its best rank-k
  approximation stays within a stated bound of Eckart–Young on the current weights.
* A lagged solve is installed exactly ``lag`` calls later, so results never depend on timing;
  its state survives a checkpoint round trip.
"""
import numpy as np
import pytest

from prunekit.app import data
from prunekit.algorithms.rpg import RPGConfig, RPGPruner
from prunekit.algorithms.trp import TRPConfig, TRPPruner
from prunekit.errors import ConfigError
from prunekit.contract.numpy_ops import NumpyOps
from prunekit.decisions.selection import energy_rank, residual_rank
from prunekit.decisions.spectrum_tracking import BasisTracker

#: same quantities through another reduction order (stacked vs per layer), float32
SAME_RTOL, SAME_ATOL = 1e-3, 1e-6
#: between solves: ‖U_k U_kᵀ Mn − EY_k(Mn)‖_F after N real SGD steps (lr 0.05, momentum 0.9) from
#: the trained ResNet-20. Measured: 0.002 after 1 step, 0.021 after 5, 0.033 after 10 (the worst
#: layer); the bound for 5 steps leaves margin and is far below a wrong subspace's error (~0.3).
DRIFT_STEPS, DRIFT_BOUND = 5, 0.04


def trained_handle(backend, trained_state):
    h = backend.model_handle("resnet20", seed=0)
    h.load_state_numpy(trained_state)
    return h


def bound(algorithm, backend, trained_state):
    return algorithm.bind(trained_handle(backend, trained_state), 1000)


def close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1e-12, float(np.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, rtol=SAME_RTOL, atol=SAME_ATOL * 10, err_msg=what)


def test_tracked_rpg_equals_the_gram_path_when_solving_every_step(backend, trained_state):
    ref = bound(RPGPruner(RPGConfig(sparsity=0.9, spectrum="gram")), backend, trained_state)
    fast = bound(RPGPruner(RPGConfig(sparsity=0.9, spectrum="tracked", refresh_every=1)), backend, trained_state)
    g_ref, g_fast = ref.rank_gradients(0.5), fast.rank_gradients(0.5)
    assert fast.ranks == ref.ranks and set(g_fast) == set(g_ref)
    assert any(0 < k < min(l.weight_shape[0], int(np.prod(l.weight_shape[1:]))) for l in ref.conv_layers
               for k in [ref.ranks[l.name]]), "trained spectra should give non-trivial ranks"
    for n in g_ref:
        close(ref.ops.to_numpy(g_fast[n]), ref.ops.to_numpy(g_ref[n]), n)
    assert fast.rank_loss == pytest.approx(ref.rank_loss, rel=1e-4)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_tracked_trp_equals_the_gram_path_when_solving_every_step(backend, trained_state, scheme):
    ref = bound(TRPPruner(TRPConfig(scheme=scheme, spectrum="gram")), backend, trained_state)
    fast = bound(TRPPruner(TRPConfig(scheme=scheme, spectrum="tracked", refresh_every=1)), backend, trained_state)
    ref.before_step(0)
    fast.before_step(0)
    assert fast.ranks == ref.ranks
    w_ref, w_fast = ref.handle.weights_numpy(), fast.handle.weights_numpy()
    for l in ref.layers:
        close(w_fast[l.name], w_ref[l.name], f"projected {l.name}")
    assert set(fast._pending) == set(ref._pending)
    for n, t in ref._pending.items():
        close(ref.ops.to_numpy(fast._pending[n]), ref.ops.to_numpy(t), f"nuclear term {n}")


def conv_matrices(state, layers):
    return {l.name: state[l.weight_name].reshape(l.weight_shape[0], -1).astype(np.float32) for l in layers}


@pytest.mark.parametrize("partial_k", [0.1, 0.2])
def test_tracked_ranks_at_a_solve_equal_full_svd(trained_state, partial_k):
    ops = NumpyOps()
    names = [k[:-len(".weight")] for k, v in trained_state.items() if k.endswith(".weight") and v.ndim == 4]
    mats = {n: trained_state[n + ".weight"].reshape(trained_state[n + ".weight"].shape[0], -1) for n in names}
    tracker = BasisTracker(ops, refresh_every=10)
    groups = tracker.stacks(mats, lambda s, e: residual_rank(s, partial_k, e))
    got = {n: k for g, _ in groups for n, k in zip(g.names, g.ranks)}
    for n, m in mats.items():
        s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
        assert got[n] == residual_rank(s, partial_k), n
    trp = BasisTracker(ops, refresh_every=10).stacks(mats, lambda s, e: energy_rank(s, 0.9, e))
    for g, _ in trp:
        for n, r in zip(g.names, g.ranks):
            assert r == energy_rank(np.linalg.svd(mats[n].astype(np.float64), compute_uv=False), 0.9), n


def test_reused_basis_stays_near_eckart_young_over_real_training_steps(trained_state):
    from prunekit.contract.backend import get_backend
    backend = get_backend("torch")
    handle = trained_handle(backend, trained_state)
    convs = [l for l in handle.layers if l.kind == "conv"]
    ops = NumpyOps()
    tracker = BasisTracker(ops, refresh_every=1000)
    choose = lambda s, e: residual_rank(s, 0.1, e)  # noqa: E731
    tracker.stacks(conv_matrices(handle.state_numpy(), convs), choose)
    ds = data.load_dataset("cifar10", train_limit=DRIFT_STEPS * 64, test_limit=10)
    trainer = backend.Trainer(handle, None, "sgd", 0.05, 0.9, 5e-4, total_steps=100, lr_schedule="constant")
    for x, y in data.batches(ds.x_train, ds.y_train, 64, seed=0, epoch=0, augment=True, mean=ds.mean, std=ds.std):
        trainer.train_step(x, y)
    mats = conv_matrices(handle.state_numpy(), convs)
    assert tracker.exact_solves == len({m.shape for m in mats.values()})
    worst = 0.0
    for group, stack in tracker.stacks(mats, choose):
        assert not tracker.solved_now
        mn = stack / np.sqrt((stack.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True))
        approx = tracker.project(group, mn.astype(np.float32))
        for i, (name, k) in enumerate(zip(group.names, group.ranks)):
            u, s, vt = np.linalg.svd(mn[i].astype(np.float64), full_matrices=False)
            worst = max(worst, float(np.linalg.norm(approx[i] - (u[:, :k] * s[:k]) @ vt[:k])))
    assert 1e-4 < worst < DRIFT_BOUND, worst  # the weights did move, and the reused basis kept up


def test_lagged_solve_installs_exactly_lag_calls_later_and_survives_a_checkpoint():
    ops = NumpyOps()
    rng = np.random.default_rng(0)
    mats = {f"l{i}": rng.standard_normal((8, 20)).astype(np.float32) for i in range(3)}
    choose = lambda s, e: residual_rank(s, 0.1, e)  # noqa: E731
    tracker = BasisTracker(ops, refresh_every=4, lag=2)
    tracker.stacks(mats, choose)  # call 0: the first solve is immediate
    assert tracker.solved_now and tracker.exact_solves == 1
    moved = {n: m + 0.5 * rng.standard_normal(m.shape).astype(np.float32) for n, m in mats.items()}
    for call in range(1, 6):
        tracker.stacks(moved, choose)
        # due at call 4, installed at call 6; nothing in between solves
        assert not tracker.solved_now, call
    saved = tracker.state_dict()
    assert saved["queued"]["install_at"] == 6
    restored = BasisTracker(ops, refresh_every=4, lag=2)
    restored.load_state_dict(saved, choose)
    for t in (tracker, restored):
        groups = t.stacks(moved, choose)  # call 6
        assert t.solved_now and t.exact_solves == 2
    a = tracker.groups[next(iter(tracker.groups))]
    b = restored.groups[next(iter(restored.groups))]
    np.testing.assert_array_equal(a.basis, b.basis)
    assert a.ranks == b.ranks
    s_ref = np.linalg.svd(np.stack(list(moved.values())).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(a.s, s_ref, rtol=1e-5, atol=1e-6)
    assert groups


def test_tracker_rejects_bad_settings():
    with pytest.raises(ConfigError, match="refresh_every"):
        BasisTracker(NumpyOps(), refresh_every=0)
    with pytest.raises(ConfigError, match="lag"):
        BasisTracker(NumpyOps(), refresh_every=4, lag=4)
    with pytest.raises(ConfigError, match="solve_lag"):
        RPGConfig(spectrum="tracked", refresh_every=5, solve_lag=5)
    with pytest.raises(ConfigError, match="solve_lag"):
        TRPConfig(spectrum="tracked", solve_lag=-1)


def test_auto_spectrum_is_tracked_on_accelerators_and_gram_on_cpus(backend):
    from prunekit.decisions.spectrum_tracking import resolve_spectrum
    assert resolve_spectrum("auto", None, None, on_accelerator=True) == ("tracked", 10, 8)
    assert resolve_spectrum("auto", None, None, on_accelerator=False) == ("gram", 50, 0)
    assert resolve_spectrum("tracked", None, None, on_accelerator=False) == ("tracked", 10, 0)
    assert resolve_spectrum("tracked", 4, None, on_accelerator=True) == ("tracked", 4, 3)
    assert resolve_spectrum("subspace", None, None, on_accelerator=True) == ("subspace", 50, 0)
    with pytest.raises(ConfigError, match="solve_lag"):
        resolve_spectrum("tracked", 4, 4, on_accelerator=True)
    # this machine has no accelerator: the default config resolves to the gram path on both backends
    rpg = RPGPruner(RPGConfig(sparsity=0.5)).bind(backend.model_handle("resnet20", seed=0), 10)
    assert rpg.spectrum == "gram" and rpg.tracker is None


@pytest.mark.parametrize("algo", ["rpg", "trp"])
def test_tracked_state_survives_a_checkpoint_mid_refresh(trained_state, algo):
    """Stop between a queued solve and its install, restore into fresh objects, continue: the
    same ranks and terms as the uninterrupted run (the queued solve is part of the state)."""
    from prunekit.contract.backend import get_backend
    backend = get_backend("torch")

    def make():
        c = dict(spectrum="tracked", refresh_every=4, solve_lag=2)
        return (RPGPruner(RPGConfig(sparsity=0.9, **c)) if algo == "rpg" else TRPPruner(TRPConfig(**c)))

    def nudge(a, step):  # weights drift between steps, as training would move them
        for l in a.layers:
            w = a.handle.state_numpy()[l.weight_name]
            noise = np.random.default_rng(step).standard_normal(w.shape).astype(np.float32) * 1e-2
            a.handle.set_weight(l.name, a.ops.asarray(w + noise * np.abs(w).mean()))

    def run(a, steps):
        out = None
        for t in steps:
            a.before_step(t)
            out = {n: a.ops.to_numpy(g) for n, g in (a._pending or {}).items()}
            nudge(a, t)
        return out

    ref = bound(make(), backend, trained_state)
    first = bound(make(), backend, trained_state)
    expected = run(ref, range(0, 7))
    run(first, range(0, 5))  # call 4 queued a solve that installs at call 6
    saved = first.state_dict()
    assert saved["tracker"]["queued"]["install_at"] == 6
    restored = make().bind(trained_handle(backend, trained_state), 1000)
    restored.handle.load_state_numpy(first.handle.state_numpy())
    restored.load_state_dict(saved)
    got = run(restored, range(5, 7))
    groups = len(ref.tracker.groups)
    assert restored.ranks == ref.ranks and restored.tracker.exact_solves == ref.tracker.exact_solves == 2 * groups
    assert set(got) == set(expected)
    for n in expected:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)
