"""Neutral helpers of the backend tests (the behaviour template and the ``*_only`` files): the
per-backend kit, a tiny user network in a handle, random batches, the positions an algorithm's
masks prune, and what leaks into them (non-zero weights, optimizer state)."""
import importlib

import numpy as np
import pytest


def kit_for(backend):
    """``tests/backends/<backend>_kit.py``: the framework pieces the template needs."""
    try:
        return importlib.import_module(f"{backend.name}_kit")
    except ModuleNotFoundError as e:
        if e.name != f"{backend.name}_kit":
            raise
        pytest.fail(f"backend {backend.name!r} has no tests/backends/{backend.name}_kit.py "
                    "(the framework pieces of the behaviour template; see torch_kit.py)")


def tiny_handle(backend, kit, seed: int = 0):
    """The kit's tiny network wrapped by the backend, with the shared seeded initialisation."""
    h = backend.wrap(kit.tiny_network(seed), kit.TINY_INPUT, "tiny")
    h.initialize(seed)
    return h


def random_batches(kit, n: int, batch: int = 8, seed: int = 0):
    """``n`` NumPy batches (images of the tiny network's input, labels of 10 classes)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch,) + tuple(kit.TINY_INPUT)).astype(np.float32),
             rng.integers(0, 10, batch).astype(kit.LABELS)) for _ in range(n)]


def pruned(algorithm, ops) -> dict:
    """``{layer: boolean array}``: where the algorithm's current masks are zero."""
    return {n: ops.to_numpy(m) == 0 for n, m in algorithm.masks.items()}


def nonzero_at(handle, where: dict) -> int:
    """Non-zero weights at the given positions."""
    w = handle.weights_numpy()
    return sum(int(np.count_nonzero(w[n][mask])) for n, mask in where.items())


def state_at_pruned(kit, optimizer, handle, where: dict) -> float:
    """The largest sum of |value| over one optimizer-state tensor at the given positions."""
    state = kit.optimizer_state(optimizer, handle)
    worst = 0.0
    for name, mask in where.items():
        for v in state.get(name, ()):
            worst = max(worst, float(np.abs(v[mask]).sum()))
    return worst
