"""SpectrumEngine.group_spectra and SpectrumGroup.weighted_projection (the per-shape-group form
RPG and TRP use) against the per-layer Spectrum / project_top / top_factors and NumPy's SVD."""
import numpy as np
import pytest

from prunekit.decisions.spectrum import SpectrumEngine, project_top, top_factors
from prunekit.contract.numpy_ops import NumpyOps


@pytest.mark.parametrize("method", ["exact", "gram", "subspace"])
def test_group_projection_matches_per_layer_and_svd(method):
    ops = NumpyOps()
    rng = np.random.default_rng(3)
    # two groups on the left side (m <= n), one on the right (m > n, handled transposed)
    mats = {f"a{i}": rng.standard_normal((8, 20)).astype(np.float32) for i in range(3)}
    mats.update({f"b{i}": rng.standard_normal((12, 5)).astype(np.float32) for i in range(2)})
    mats["c"] = rng.standard_normal((6, 6)).astype(np.float32)
    engine = SpectrumEngine(ops, method)
    groups = engine.group_spectra(mats, {n: 3 for n in mats})
    assert sorted(n for g in groups for n in g.names) == sorted(mats)
    singles = SpectrumEngine(ops, method).spectra(mats, {n: 3 for n in mats})
    for g in groups:
        b, q = g.s.shape
        assert g.side == ("right" if g.stack.shape[1] > g.stack.shape[2] else "left")
        ks = [1 + i % 3 for i in range(b)]
        keep = np.zeros((b, q))
        inv = np.zeros((b, q))
        for i, k in enumerate(ks):
            keep[i, :k] = 1.0
            inv[i, :k] = 1.0 / g.s[i, :k]
        proj = g.weighted_projection(ops, g.stack, keep)
        uv = g.weighted_projection(ops, g.stack, inv)
        for i, (n, k) in enumerate(zip(g.names, ks)):
            m = mats[n].astype(np.float64)
            np.testing.assert_array_equal(g.stack[i], mats[n])
            u, s, vh = np.linalg.svd(m, full_matrices=False)
            np.testing.assert_allclose(g.s[i][:k], s[:k], rtol=1e-4)
            assert g.total_energy[i] == pytest.approx(np.sum(m * m), rel=1e-5)
            ref = (u[:, :k] * s[:k]) @ vh[:k]
            assert np.linalg.norm(proj[i] - ref) <= 1e-4 * np.linalg.norm(ref), n
            assert np.linalg.norm(uv[i] - u[:, :k] @ vh[:k]) <= 1e-3 * np.sqrt(k), n
            # the same numbers as the per-layer helpers
            spec = singles[n]
            np.testing.assert_allclose(proj[i], project_top(ops, mats[n], spec, k), rtol=1e-4, atol=1e-5)
            fu, _, fvh = top_factors(ops, mats[n], spec, k)
            np.testing.assert_allclose(uv[i], fu @ fvh, rtol=1e-3, atol=1e-4)
    # zero coefficients: nothing projected
    g = groups[0]
    np.testing.assert_array_equal(g.weighted_projection(ops, g.stack, np.zeros(g.s.shape)), np.zeros(g.stack.shape))


def test_flip_gives_a_contiguous_copy():
    ops = NumpyOps()
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    f = ops.flip(x, 1)
    np.testing.assert_array_equal(f, x[:, ::-1])
    assert f.flags["C_CONTIGUOUS"] and not np.shares_memory(f, x)
