"""The MindSpore Trainer's compiled fast paths (backends/mindspore/fused.py): the fused update
(gradient masks, RPG/TRP's additive terms, optimizer, weight masks in one compiled call) and the
batched weight write give the same weights as the generic per-layer path."""
import numpy as np
import pytest

ms_backend = pytest.importorskip("prunekit.backends.mindspore")

from prunekit.algorithms.rpg import RPGConfig, RPGPruner  # noqa: E402
from prunekit.algorithms.trp import TRPConfig, TRPPruner  # noqa: E402
from prunekit.backends.mindspore.fused import FusedUpdate  # noqa: E402

STEPS = 5


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((16, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 16).astype(np.int64))
            for _ in range(2)]


def count_fused(trainer):
    """Counts the steps the trainer's fused update took (True returns)."""
    fused, calls = trainer._fused, []

    class Counting(FusedUpdate):
        def __call__(self, grads):
            done = FusedUpdate.__call__(self, grads)
            calls.append(done)
            return done

    trainer._fused = Counting(fused.session, fused.optimizer)
    return calls


def train(make_algorithm, batches, fused: bool):
    h = ms_backend.model_handle("resnet20", seed=0)
    alg = make_algorithm()
    t = ms_backend.Trainer(h, alg, "sgd", 0.05, 0.9, 5e-4, total_steps=STEPS, lr_schedule="constant")
    calls = count_fused(t)
    if not fused:
        t._fused = None
    for i in range(STEPS):
        float(t.train_step(*batches[i % len(batches)]))
    return h.state_numpy(), calls, alg


@pytest.mark.parametrize("algorithm", ["rpg", "trp"])
def test_fused_update_gives_the_generic_paths_weights(batches, algorithm):
    if algorithm == "rpg":  # a mask update at step 2 (dense gradients at step 1: generic there)
        make = lambda: RPGPruner(RPGConfig(sparsity=0.9, frequency=2, end_fraction=0.5, drop_alpha=0.3))  # noqa: E731
    else:
        make = lambda: TRPPruner(TRPConfig(every=1, lam=1e-2))  # noqa: E731
    fast, calls, alg = train(make, batches, fused=True)
    slow, _, _ = train(make, batches, fused=False)
    if algorithm == "rpg":
        assert calls == [True, False, True, True, True]
        assert alg.masks and alg.current_sparsity > 0
    else:
        assert calls == [True] * STEPS
    assert fast.keys() == slow.keys()
    for k in fast:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-5, atol=1e-7, err_msg=k)
        if algorithm == "rpg" and k.endswith(".weight") and k.rsplit(".", 1)[0] in alg.masks:
            np.testing.assert_array_equal(fast[k] == 0, slow[k] == 0, err_msg=k)


def test_fused_update_masks_the_weights_after_the_optimizer_step(batches):
    """A pruned weight made non-zero behind the algorithm's back is zero after a fused step
    (weight decay alone would leave it at 1 - lr·wd if the masking came before the update)."""
    h = ms_backend.model_handle("resnet20", seed=0)
    alg = RPGPruner(RPGConfig(sparsity=0.9, frequency=1, end_fraction=0.01, drop_alpha=0.0))
    t = ms_backend.Trainer(h, alg, "sgd", 0.05, 0.9, 5e-4, total_steps=200, lr_schedule="constant")
    calls = count_fused(t)
    float(t.train_step(*batches[0]))
    float(t.train_step(*batches[1]))   # step 1: the mask update to 90 %
    assert alg.current_sparsity == pytest.approx(0.9)
    masks = {n: alg.ops.to_numpy(m) for n, m in alg.masks.items()}
    session = t.session
    session.before_step()
    for n, m in masks.items():
        h.set_weight(n, h.ops.asarray(np.where(m > 0, h.ops.to_numpy(h.weight(n)), 1.0).astype(np.float32)))
    session.before_step = lambda: None  # done above
    try:
        float(t.train_step(*batches[0]))
    finally:
        del session.before_step
    assert calls[-1] is True
    for n, m in masks.items():
        w = h.ops.to_numpy(h.weight(n))
        assert np.all(w[m == 0] == 0), n
        assert np.count_nonzero(w) > 0, n


def test_set_weights_writes_every_layer_in_one_call():
    h = ms_backend.model_handle("resnet20", seed=0)
    names = [l.name for l in h.layers][:4]
    rng = np.random.default_rng(1)
    values = {n: rng.standard_normal(h.ops.shape(h.weight(n))).astype(np.float32) for n in names}
    before = h.weights_numpy()
    h.set_weights({n: h.ops.asarray(v) for n, v in values.items()})
    after = h.weights_numpy()
    for n in after:
        np.testing.assert_array_equal(after[n], values[n] if n in values else before[n], err_msg=n)
    h.set_weights({names[0]: h.ops.asarray(values[names[1]][:0].sum() + values[names[0]] * 2, dtype="float64")})
    np.testing.assert_allclose(h.ops.to_numpy(h.weight(names[0])), values[names[0]] * 2, rtol=1e-6)
    assert h.ops.dtype(h.weight(names[0])) == "float32"


def test_numpy_blas_runs_one_thread_beside_mindspore_on_cpu():
    """NumPy's OpenBLAS threads would compete with MindSpore's (see backends/mindspore/runtime.py)."""
    import os
    from prunekit.backends.mindspore.runtime import host_blas_threads, limit_host_blas_threads
    if host_blas_threads() is None:
        pytest.skip("NumPy bundles no OpenBLAS here")
    if "OPENBLAS_NUM_THREADS" not in os.environ and os.environ.get("PRUNEKIT_MS_HOST_BLAS_THREADS") is None:
        assert host_blas_threads() == 1
    assert limit_host_blas_threads(2) and host_blas_threads() in (1, 2)  # capped by the machine's cores
    assert limit_host_blas_threads(1) and host_blas_threads() == 1
