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


def check_qr_and_eigh(ops):
    """QR and eigh of an ops object: batches, R's triangle, eigenvalues ascending, eigenvectors in
    columns, single and batched matrices (the conformance case has one matrix of each)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    q, r = (ops.to_numpy(t) for t in ops.qr(ops.asarray(x)))
    assert q.shape == (3, 6, 4) and r.shape == (3, 4, 4)
    np.testing.assert_allclose(q @ r, x, atol=1e-5)
    np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-5)
    np.testing.assert_array_equal(np.tril(r, -1), 0)
    a = rng.standard_normal((2, 5, 5))
    sym = (a + np.swapaxes(a, -1, -2)).astype(np.float32)
    for mat in (sym, sym[0]):
        w, v = (ops.to_numpy(t) for t in ops.eigh(ops.asarray(mat)))
        assert w.shape == mat.shape[:-1] and v.shape == mat.shape
        np.testing.assert_allclose(w, np.linalg.eigvalsh(mat.astype(np.float64)), atol=1e-4)
        assert np.all(np.diff(w, axis=-1) >= 0)
        np.testing.assert_allclose(mat @ v, v * w[..., None, :], atol=1e-4)
