"""Divergence detection in the training session (``prunekit.app.divergence``), on both backends: a
NaN gradient mid-run stops training at that step with an error naming the step and the first
layer affected, before the algorithm decides anything from it (magnitude does not mask every
layer, RPG/TRP never reach their linear algebra), with or without an algorithm bound."""
import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.app.divergence import DivergenceError
from prunekit.app.job import RunConfig
from prunekit.contract.backend import get_backend


def _batches(n):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, size=8)) for _ in range(n)]


@pytest.mark.parametrize("backend_name, name", [("torch", n) for n in ("magnitude", "rpg", "trp", None)]
                         + [("mindspore", "rpg")])  # MindSpore: the run's divergence test covers plain training
def test_nan_gradient_mid_run_stops_before_any_decision(backend_name, name):
    backend = get_backend(backend_name)
    handle = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    steps = 6
    algorithm = None
    if name is not None:  # decisions every step, so the poisoned step is followed by one
        cfg = RunConfig(algorithm=name, sparsity=0.5, frequency=1, end_fraction=1.0)
        algorithm = make_algorithm(name, **cfg.algorithm_kwargs(steps))
    trainer = backend.Trainer(handle, algorithm, "sgd", 0.01, total_steps=steps)
    batches = _batches(steps)
    for x, y in batches[:3]:
        trainer.train_step(x, y)
    bad_x = batches[3][0].copy()
    bad_x[0, 0, 5, 5] = np.nan  # one poisoned pixel: NaN loss, NaN gradients
    with pytest.raises(DivergenceError) as e:
        trainer.train_step(bad_x, batches[3][1])
    assert e.value.step == 3 and "at step 3" in str(e.value)
    assert e.value.layer == handle.layers[0].name  # the first layer in the model's order
    if algorithm is not None and algorithm.masks:  # decided from finite weights only: no layer masked whole
        for k, m in algorithm.masks.items():
            m = np.asarray(algorithm.ops.to_numpy(m))
            assert set(np.unique(m)) <= {0.0, 1.0} and m.mean() > 0.2, k
    # the weights the next decision would read are not used: the trainer refuses to go on
    with pytest.raises(DivergenceError):
        trainer.train_step(*batches[4])

def test_finite_run_is_not_disturbed():
    backend = get_backend("torch")
    handle = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    trainer = backend.Trainer(handle, None, "sgd", 0.01, total_steps=4)
    for x, y in _batches(4):
        assert np.isfinite(float(trainer.train_step(x, y)))
