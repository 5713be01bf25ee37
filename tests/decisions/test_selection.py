"""Selection rules (prunekit/decisions/selection.py) against NumPy / exact-arithmetic references.

The op-level rules (top-k masks, channel scores) run on every available backend through the
``neutral_ops`` fixture; the host-side rules (keep counts, rank choices) are plain Python.
"""
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import numpy as np
import pytest

from prunekit.errors import ConfigError
from prunekit.decisions.selection import (channel_scores, check_sparsity, energy_rank, expand_channel_mask,
                                global_topk_masks, keep_count, residual_rank, topk_mask, value_rank)


# ---------------------------------------------------------------- references
def ref_topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the first k of the order (score descending, flat index ascending)."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))  # last key is the primary one
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:max(0, k)]] = True
    return keep.reshape(np.shape(scores))


def ref_keep_count(n: int, sparsity: str) -> int:
    """round-half-up of n * (1 - s) with s taken as the written decimal."""
    return int((n * (1 - Decimal(sparsity))).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def exact_energies(s):
    return [Fraction(float(v)) ** 2 for v in np.asarray(s, dtype=np.float64).reshape(-1)]


def ref_energy_rank(s, energy: float) -> int:
    e = exact_energies(s)
    total = sum(e)
    if total == 0:
        return 0
    target = Fraction(repr(energy)) * total  # the decimal as written
    acc = Fraction(0)
    for r, v in enumerate(e, start=1):
        acc += v
        if acc >= target:
            return r
    return len(e)


def ref_value_rank(s, threshold: float) -> int:
    return sum(1 for v in np.asarray(s, dtype=np.float64).reshape(-1) if v >= threshold)


def ref_residual_rank(s, partial_k: float) -> int:
    e = exact_energies(s)
    total = sum(e)
    if total == 0:
        return 0
    best_k, best_d = None, None
    for k in range(len(e) + 1):
        residual = sum(e[k:]) / total  # energy left after keeping the first k, ||Mn||_F = 1
        d = abs(residual - Fraction(repr(partial_k)))  # the decimal as written
        if best_d is None or d <= best_d:  # "<=": ties go to the larger k
            best_k, best_d = k, d
    return best_k


def random_shapes(rng, count):
    shapes = []
    for _ in range(count):
        nd = int(rng.integers(1, 5))
        shapes.append(tuple(int(d) for d in rng.integers(1, 7, size=nd)))
    return shapes


def ks_for(n, rng):
    return sorted({0, 1, max(0, n - 1), n, int(rng.integers(0, n + 1)), n + 3})


# ---------------------------------------------------------------- top-k masks
def _check_topk(ops, scores, k):
    mask = topk_mask(ops, ops.asarray(scores), k)
    assert ops.dtype(mask) == "float32"
    got = ops.to_numpy(mask)
    assert got.shape == scores.shape
    assert set(np.unique(got)) <= {0.0, 1.0}
    expected = ref_topk_mask(scores, k)
    np.testing.assert_array_equal(got.astype(bool), expected, err_msg=f"k={k} scores={scores.ravel()}")
    assert int(got.sum()) == min(max(k, 0), scores.size)


def test_topk_mask_heavy_ties_many_shapes(neutral_ops):
    rng = np.random.default_rng(0)
    for shape in random_shapes(rng, 60):
        # integer-valued scores from a tiny range: almost every threshold falls inside a tie
        scores = rng.integers(0, 4, size=shape).astype(np.float32)
        for k in ks_for(scores.size, rng):
            _check_topk(neutral_ops, scores, k)


def test_topk_mask_distinct_and_negative_scores(neutral_ops):
    rng = np.random.default_rng(1)
    for shape in random_shapes(rng, 20):
        scores = rng.standard_normal(shape).astype(np.float32)
        for k in ks_for(scores.size, rng):
            _check_topk(neutral_ops, scores, k)


def test_topk_mask_all_equal_and_all_zero(neutral_ops):
    for value in (0.0, 2.5):
        scores = np.full((3, 5, 2), value, np.float32)
        for k in (0, 1, 7, 29, 30):
            _check_topk(neutral_ops, scores, k)
            got = neutral_ops.to_numpy(topk_mask(neutral_ops, neutral_ops.asarray(scores), k)).reshape(-1)
            # all tied: the first k flat indices win
            np.testing.assert_array_equal(got, (np.arange(30) < k).astype(np.float32))


def test_topk_mask_large_tied_vector(neutral_ops):
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, size=5000).astype(np.float32)
    for k in (1, 1234, 1667, 2500, 4999):
        _check_topk(neutral_ops, scores, k)


def test_global_topk_masks_matches_reference(neutral_ops):
    ops = neutral_ops
    rng = np.random.default_rng(3)
    for trial in range(15):
        shapes = random_shapes(rng, int(rng.integers(1, 5)))
        names = [f"layer{i}.w" for i in range(len(shapes))][::-1]  # dict order, not sorted order
        arrays = {n: rng.integers(0, 3, size=s).astype(np.float32) for n, s in zip(names, shapes)}
        total = sum(a.size for a in arrays.values())
        for k in ks_for(total, rng):
            got = global_topk_masks(ops, {n: ops.asarray(a) for n, a in arrays.items()}, k)
            assert list(got) == names
            flat_ref = ref_topk_mask(np.concatenate([arrays[n].reshape(-1) for n in names]), k)
            start = 0
            for n in names:
                a = arrays[n]
                g = ops.to_numpy(got[n])
                assert g.shape == a.shape
                np.testing.assert_array_equal(g.astype(bool), flat_ref[start:start + a.size].reshape(a.shape))
                start += a.size


def test_global_topk_is_one_threshold(neutral_ops):
    """With distinct scores, every kept score beats every dropped one across tensors."""
    ops = neutral_ops
    rng = np.random.default_rng(4)
    arrays = {"a": rng.random((8, 3)).astype(np.float32), "b": (rng.random(50) * 3).astype(np.float32)}
    got = global_topk_masks(ops, {n: ops.asarray(a) for n, a in arrays.items()}, 30)
    kept = np.concatenate([arrays[n][ops.to_numpy(got[n]) > 0] for n in arrays])
    dropped = np.concatenate([arrays[n][ops.to_numpy(got[n]) == 0] for n in arrays])
    assert kept.size == 30 and kept.min() > dropped.max()


def test_channel_scores_and_expand(neutral_ops):
    ops = neutral_ops
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    l2 = ops.to_numpy(channel_scores(ops, ops.asarray(w), "l2"))
    l1 = ops.to_numpy(channel_scores(ops, ops.asarray(w), "l1"))
    np.testing.assert_allclose(l2, np.sqrt((w.astype(np.float64) ** 2).reshape(6, -1).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(l1, np.abs(w.astype(np.float64)).reshape(6, -1).sum(1), rtol=1e-5)
    with pytest.raises(ConfigError, match="linf"):
        channel_scores(ops, ops.asarray(w), "linf")
    cm = np.array([1, 0, 0, 1, 1, 0], np.float32)
    full = ops.to_numpy(expand_channel_mask(ops, ops.asarray(cm), w.shape))
    np.testing.assert_array_equal(full, np.broadcast_to(cm[:, None, None, None], w.shape))


# ---------------------------------------------------------------- keep counts and sparsity checks
@pytest.mark.parametrize("sparsity", ["0", "0.1", "0.25", "0.3", "0.5", "0.75", "0.9", "0.95", "0.99", "0.999"])
def test_keep_count_rounds_half_up(sparsity):
    for n in list(range(0, 400)) + [1000, 4321, 270000, 10 ** 7 + 5]:
        assert keep_count(n, float(sparsity)) == ref_keep_count(n, sparsity), (n, sparsity)


def test_keep_count_known_values():
    assert keep_count(10, 0.0) == 10
    assert keep_count(10, 0.25) == 8   # 7.5 -> 8 (half up)
    assert keep_count(45, 0.3) == 32   # 31.5 -> 32, where float arithmetic gives 31.4999...
    assert keep_count(5, 0.9) == 1     # 0.5 -> 1
    assert keep_count(3, 0.9) == 0
    with pytest.raises(ConfigError):
        keep_count(10, 1.0)


@pytest.mark.parametrize("bad, shown", [(1.5, "1.5"), (-0.1, "-0.1"), (1.0, "1.0"), (float("nan"), "nan"),
                                        ("abc", "abc"), (float("inf"), "inf"), (None, "None")])
def test_check_sparsity_rejects_with_value_named(bad, shown):
    with pytest.raises(ConfigError) as info:
        check_sparsity(bad)
    assert shown in str(info.value)


def test_check_sparsity_accepts():
    assert check_sparsity(0) == 0.0
    assert check_sparsity(0.5) == 0.5
    assert check_sparsity("0.75") == 0.75
    assert check_sparsity(np.float32(0.25)) == 0.25
    assert check_sparsity(0.999999) == 0.999999


# ---------------------------------------------------------------- rank choices
def _spectra():
    rng = np.random.default_rng(6)
    out = []
    for n in (1, 2, 3, 5, 8, 16, 33):
        for _ in range(6):
            s = np.sort(rng.random(n) * rng.choice([1e-3, 1.0, 50.0]))[::-1]
            out.append(s)
            if n > 2:  # rank-deficient: exact zeros at the tail
                t = s.copy()
                t[int(rng.integers(1, n)):] = 0.0
                out.append(t)
    out += [np.zeros(4), np.zeros(1), np.ones(4), np.ones(10), np.array([2.0, 2.0, 1.0, 1.0]),
            np.array([3.0, 0.0, 0.0]), np.array([1.0])]
    return out


ENERGIES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
PARTIALS = (0.0, 0.05, 0.1, 0.125, 0.2, 0.25, 0.375, 0.5, 0.9, 1.0)
THRESHOLDS = (0.0, 0.05, 0.5, 1.0, 2.0, 10.0)


def test_energy_rank_matches_exact_definition():
    for s in _spectra():
        for e in ENERGIES:
            assert energy_rank(s, e) == ref_energy_rank(s, e), (s, e)


def test_energy_rank_exact_ties_and_degenerate():
    assert energy_rank(np.ones(4), 0.5) == 2      # exactly meets at r = 2: the first index meeting it
    assert energy_rank(np.ones(4), 0.75) == 3
    assert energy_rank(np.ones(4), 1.0) == 4
    assert energy_rank([3.0, 2.0, 0.0, 0.0], 1.0) == 2   # rank-deficient
    assert energy_rank(np.zeros(5), 0.9) == 0             # all-zero spectrum
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError):
            energy_rank(np.ones(3), bad)


def test_value_rank_matches_definition():
    for s in _spectra():
        for t in THRESHOLDS:
            assert value_rank(s, t) == ref_value_rank(s, t)
    assert value_rank([1.0, 0.05, 0.05, 0.01], 0.05) == 3  # ">=": values on the threshold count
    assert value_rank(np.zeros(3), 0.05) == 0


def test_residual_rank_matches_exact_definition():
    for s in _spectra():
        for p in PARTIALS:
            assert residual_rank(s, p) == ref_residual_rank(s, p), (s, p)


def test_residual_rank_ties_and_scale():
    # residuals 1, .75, .5, .25, 0: distances to .375 tie at k = 2 and 3 -> larger k
    assert residual_rank(np.ones(4), 0.375) == 3
    # s^2 = 2, 1, 1 of 4: residuals 1, .5, .25, 0 -> |.25 - .375| is the smallest distance
    assert residual_rank(np.sqrt([2.0, 1.0, 1.0]), 0.375) == 2
    # rank-deficient: every k >= rank leaves 0 residual; ties -> the largest k
    assert residual_rank([2.0, 1.0, 0.0, 0.0], 0.0) == 4
    assert residual_rank(np.zeros(3), 0.1) == 0
    rng = np.random.default_rng(7)
    s = np.sort(rng.random(12))[::-1]
    for p in PARTIALS:  # the matrix is normalised first: scale does not matter
        assert residual_rank(s, p) == residual_rank(s * 37.0, p)
