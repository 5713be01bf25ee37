"""The rank machinery shared by RPG and TRP (prunekit/decisions/spectrum.py), on every backend that loads.

Matrix views and their inverse; the three spectrum methods of :class:`SpectrumEngine` against a
float64 NumPy SVD on the conv weights of a ResNet-20 *trained on CIFAR-10* (trained spectra decay,
random ones are flat and would make rank choices trivially stable or trivially fragile); the
ranks each fast path picks for RPG (residual energy) and TRP (energy) against the full SVD's;
best rank-k approximations and truncated factors against Eckart–Young; the warm-started subspace
method on slowly drifting weights; tall matrices, where the engine works on the right side.

All expectations come from NumPy float64 (``np.linalg.svd``) and rank rules re-implemented here
from ALGORITHMS.md, never from prunekit's own output.
"""

import numpy as np
import pytest

from prunekit.errors import ConfigError
from prunekit.decisions.spectrum import SpectrumEngine, from_matrix_view, matrix_view, project_top, top_factors
from prunekit.decisions.selection import energy_rank, residual_rank


# ---------------------------------------------------------------- tolerances (and why)
#: exact (batched float32 SVD) vs float64 SVD: |Δσ_i| <= EXACT_ATOL * σ_1. A backward-stable SVD
#: in float32 perturbs singular values by about eps32 * ‖M‖_2 ≈ 1.2e-7 σ_1; 1e-5 leaves margin
#: for the float32 input rounding and the reduction order of large matrices.
EXACT_ATOL = 1e-5
#: gram (eigh of M Mᵀ in float32): the Gram matrix squares the condition number, so σ_i² carries
#: an absolute error of about eps32 * σ_1², i.e. σ_i a *relative* one of eps32 * (σ_1/σ_i)² / 2.
#: We compare only the leading values (σ_i >= LEADING * σ_1, where that bound is <= 3e-5) with
#: rtol 1e-3; the trailing ones are only required to be small in absolute terms.
GRAM_RTOL = 1e-3
LEADING = 0.05
GRAM_TAIL_ATOL = 1e-3  # × σ_1: sqrt(eps32) ≈ 3.5e-4 is the floor of σ from a float32 Gram matrix
#: subspace method (one warm-started power iteration per step + Rayleigh–Ritz): Ritz values
#: converge like the squared subspace angle, so leading values track to ~1e-3 relative.
SUBSPACE_RTOL = 1e-3
#: best rank-k approximation vs Eckart–Young's U_k Σ_k V_kᵀ: ‖P − M_k‖_F <= APPROX_TOL ‖M‖_F.
#: Limited by how well the k-th singular direction is separated from the (k+1)-th; 1e-3 of the
#: whole matrix's norm is far above float32 noise and far below what a wrong subspace gives.
APPROX_TOL = 1e-3
#: rank choices: a reference decision is called a near-tie (and either neighbour accepted) only
#: when its margin is below this fraction of the total energy; float32 spectra move the
#: energy fractions by ~1e-6, so real trained weights essentially never hit it (counted below).
TIE_MARGIN = 2e-5

PARTIAL_KS = (0.1, 0.2)   # RPG's residual energy targets (release: 0.1 CIFAR, 0.1–0.2 ImageNet)
ENERGIES = (0.9, 0.5)     # TRP's energy targets (release: 0.9)
METHODS = ("exact", "gram", "subspace")


# ---------------------------------------------------------------- NumPy references
def ref_svd(m):
    return np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)


def ref_residual_rank(s, partial_k):
    """k whose residual energy Σ_{i>k} σ_i² / E is closest to partial_k; ties → larger k.
    Returns (k, margin): margin = gap between the best and second-best distance."""
    e = np.asarray(s, np.float64) ** 2
    total = e.sum()
    dists = []
    for k in range(len(e) + 1):
        residual = e[k:].sum() / total
        dists.append(abs(residual - partial_k))
    dists = np.array(dists)
    best = dists.min()
    k = max(i for i, d in enumerate(dists) if d == best)
    others = np.delete(dists, k)
    return k, float(others.min() - best)


def ref_energy_rank(s, energy):
    """Smallest r with Σ_{i<=r} σ_i² >= energy·E. Returns (r, margin to the threshold)."""
    e = np.asarray(s, np.float64) ** 2
    frac = np.cumsum(e) / e.sum()
    r = int(np.argmax(frac >= energy)) + 1
    margin = min(abs(frac[r - 1] - energy), abs(frac[r - 2] - energy) if r >= 2 else 1.0)
    return r, float(margin)


def eckart_young(m, k):
    u, s, vh = ref_svd(m)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel_err(a, b, scale):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / scale)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained_convs(trained_state):
    """Conv weights of the trained ResNet-20, by layer name (shared parameter names)."""
    convs = {k[:-len(".weight")]: v.astype(np.float32) for k, v in trained_state.items()
             if k.endswith(".weight") and v.ndim == 4}
    assert len(convs) == 19  # stem + 18 block convs
    return convs


def channel_mats(convs):
    return {n: w.reshape(w.shape[0], -1) for n, w in convs.items()}


def as_tensors(ops, mats):
    return {n: ops.asarray(m) for n, m in mats.items()}


def n_shapes(mats):
    return len({m.shape for m in mats.values()})


def check_rank(chosen, ref, margin, what, near_ties):
    if margin < TIE_MARGIN:
        near_ties.append(what)
        assert abs(chosen - ref) <= 1, (what, chosen, ref)
    else:
        assert chosen == ref, (what, chosen, ref)


# ---------------------------------------------------------------- matrix views
@pytest.mark.parametrize("shape", [(5, 3, 2, 4), (7, 2, 3, 3), (4, 6, 1, 1)])
def test_matrix_view_round_trip_and_layout(neutral_ops, shape):
    ops = neutral_ops
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    t = ops.asarray(w)
    co, ci, kh, kw = shape
    channel = ops.to_numpy(matrix_view(ops, t, "channel"))
    np.testing.assert_array_equal(channel, w.reshape(co, ci * kh * kw))
    spatial = ops.to_numpy(matrix_view(ops, t, "spatial"))
    assert spatial.shape == (ci * kh, co * kw)
    np.testing.assert_array_equal(spatial, w.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw))
    # entry by entry: row (c, h), column (o, x) holds W[o, c, h, x]
    o, c, h, x = co - 1, ci - 1, kh - 1, 0
    assert spatial[c * kh + h, o * kw + x] == w[o, c, h, x]
    for scheme in ("channel", "spatial"):
        back = ops.to_numpy(from_matrix_view(ops, matrix_view(ops, t, scheme), shape, scheme))
        np.testing.assert_array_equal(back, w)
    # the inverse also works on a matrix that did not come from matrix_view
    m = rng.standard_normal((ci * kh, co * kw)).astype(np.float32)
    back = ops.to_numpy(from_matrix_view(ops, ops.asarray(m), shape, "spatial"))
    np.testing.assert_array_equal(back.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw), m)
    with pytest.raises(ConfigError, match="diagonal"):
        matrix_view(ops, t, "diagonal")


def test_matrix_view_of_linear_weight_is_itself(neutral_ops):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    for scheme in ("channel", "spatial"):
        np.testing.assert_array_equal(neutral_ops.to_numpy(matrix_view(neutral_ops, neutral_ops.asarray(w), scheme)), w)


# ---------------------------------------------------------------- spectra on trained weights
@pytest.mark.parametrize("method", METHODS)
def test_singular_values_match_numpy(neutral_ops, trained_convs, method):
    ops = neutral_ops
    for scheme in ("channel", "spatial"):
        mats = {n: w.reshape(w.shape[0], -1) if scheme == "channel" else w.transpose(1, 2, 0, 3).reshape(
            w.shape[1] * w.shape[2], w.shape[0] * w.shape[3]) for n, w in trained_convs.items()}
        engine = SpectrumEngine(ops, method, refresh_every=10)
        need = {n: 8 for n in mats}
        spectra = engine.spectra(as_tensors(ops, mats), need)
        assert set(spectra) == set(mats)
        for n, m in mats.items():
            _, s_ref, _ = ref_svd(m)
            spec = spectra[n]
            assert spec.side == ("left" if m.shape[0] <= m.shape[1] else "right"), (n, scheme)
            assert spec.total_energy == pytest.approx(float(np.sum(m.astype(np.float64) ** 2)), rel=1e-5)
            s = spec.s
            assert np.all(np.diff(s) <= 1e-6 * s[0]), (n, "not descending")
            q = len(s)
            assert q >= min(need[n] + 4, min(m.shape)) and q <= min(m.shape)
            if method == "exact":
                np.testing.assert_allclose(s, s_ref[:q], rtol=0, atol=EXACT_ATOL * s_ref[0], err_msg=f"{n} {scheme}")
            else:  # gram, and subspace on its first call (an exact Gram solve)
                lead = s_ref[:q] >= LEADING * s_ref[0]
                assert lead.sum() >= 3
                np.testing.assert_allclose(s[lead], s_ref[:q][lead], rtol=GRAM_RTOL, err_msg=f"{n} {scheme}")
                np.testing.assert_allclose(s, s_ref[:q], rtol=0, atol=GRAM_TAIL_ATOL * s_ref[0],
                                           err_msg=f"{n} {scheme}")
            assert spec.exact == (q == min(m.shape))
            if spec.exact:
                assert float(np.sum(spec.energies())) == pytest.approx(spec.total_energy, rel=1e-4)
            else:  # the unexplained remainder is one lump at the end
                en = spec.energies()
                assert len(en) == q + 1 and en[-1] >= 0
                assert float(np.sum(en)) == pytest.approx(spec.total_energy, rel=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_fast_paths_choose_the_full_svd_ranks(neutral_ops, trained_convs, method):
    """RPG's residual_rank and TRP's energy_rank on each method's spectrum == on the float64 SVD's,
    and the rank-k projection is Eckart–Young's best approximation."""
    ops = neutral_ops
    mats = channel_mats(trained_convs)
    refs = {n: ref_svd(m)[1] for n, m in mats.items()}
    want = {}
    for n, s in refs.items():
        want[n] = max([ref_residual_rank(s, p)[0] for p in PARTIAL_KS] + [ref_energy_rank(s, e)[0] for e in ENERGIES])
    engine = SpectrumEngine(ops, method)
    spectra = engine.spectra(as_tensors(ops, mats), want)
    tensors = as_tensors(ops, mats)
    near_ties, distinct = [], set()
    for n, m in mats.items():
        spec, s_ref = spectra[n], refs[n]
        for p in PARTIAL_KS:
            k_ref, margin = ref_residual_rank(s_ref, p)
            k = residual_rank(spec.s, p, spec.total_energy)
            check_rank(k, k_ref, margin, (n, "partial_k", p), near_ties)
            distinct.add(k_ref)
            approx = ops.to_numpy(project_top(ops, tensors[n], spec, k_ref))
            scale = np.linalg.norm(m.astype(np.float64))
            assert rel_err(approx, eckart_young(m, k_ref), scale) < APPROX_TOL, (n, p, k_ref)
            # and its residual is the tail energy (the optimum of Eckart–Young)
            resid = np.sum((m.astype(np.float64) - approx) ** 2) / scale ** 2
            assert resid == pytest.approx(np.sum(s_ref[k_ref:] ** 2) / scale ** 2, abs=1e-4)
        for e in ENERGIES:
            r_ref, margin = ref_energy_rank(s_ref, e)
            r = energy_rank(spec.s, e, spec.total_energy)
            check_rank(r, r_ref, margin, (n, "energy", e), near_ties)
    assert len(near_ties) <= 2, near_ties        # the trained spectra do discriminate
    assert len(distinct) >= 4                    # and the ranks differ between layers


def test_rank_rules_on_trained_spectra_are_not_trivial(trained_convs):
    """Sanity of the data the rank tests rely on: trained spectra decay (ranks well inside (1, n))."""
    for n, m in channel_mats(trained_convs).items():
        s = ref_svd(m)[1]
        k, _ = ref_residual_rank(s, 0.1)
        r, _ = ref_energy_rank(s, 0.5)
        assert 1 <= r < k < len(s), (n, r, k, len(s))


def test_project_top_rank_zero_and_full(neutral_ops, trained_convs):
    ops = neutral_ops
    m = channel_mats(trained_convs)["layer2.1.conv1"]
    t = ops.asarray(m)
    spec = SpectrumEngine(ops, "exact").spectra({"a": t})["a"]
    np.testing.assert_array_equal(ops.to_numpy(project_top(ops, t, spec, 0)), np.zeros_like(m))
    full = ops.to_numpy(project_top(ops, t, spec, min(m.shape)))
    assert rel_err(full, m, np.linalg.norm(m)) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_top_factors_reconstruct_the_truncation(neutral_ops, trained_convs, method):
    ops = neutral_ops
    mats = channel_mats(trained_convs)
    refs = {n: ref_svd(m) for n, m in mats.items()}
    need = {n: ref_energy_rank(refs[n][1], 0.9)[0] for n in mats}
    spectra = SpectrumEngine(ops, method).spectra(as_tensors(ops, mats), need)
    for n, m in mats.items():
        r = need[n]
        u, s, vh = (ops.to_numpy(x).astype(np.float64) for x in top_factors(ops, ops.asarray(m), spectra[n], r))
        assert u.shape == (m.shape[0], r) and s.shape == (r,) and vh.shape == (r, m.shape[1])
        scale = np.linalg.norm(m.astype(np.float64))
        assert rel_err((u * s) @ vh, eckart_young(m, r), scale) < APPROX_TOL, n
        np.testing.assert_allclose(s, refs[n][1][:r], rtol=GRAM_RTOL)
        np.testing.assert_allclose(u.T @ u, np.eye(r), atol=2e-3, err_msg=n)
        np.testing.assert_allclose(vh @ vh.T, np.eye(r), atol=2e-3, err_msg=n)
        # U_r V_rᵀ (TRP's nuclear-norm sub-gradient) is the reference's
        u_ref, _, vh_ref = refs[n]
        np.testing.assert_allclose(u @ vh, u_ref[:, :r] @ vh_ref[:r], atol=5e-3, err_msg=n)


# ---------------------------------------------------------------- subspace method over "training"
def drift(mats, rng, rel=1e-3):
    """One simulated optimizer step: every matrix moves by ~rel of its RMS entry."""
    out = {}
    for n, m in mats.items():
        rms = np.sqrt(np.mean(m.astype(np.float64) ** 2))
        out[n] = (m + rel * rms * rng.standard_normal(m.shape)).astype(np.float32)
    return out


def test_subspace_tracks_drifting_weights(neutral_ops, trained_convs):
    ops = neutral_ops
    rng = np.random.default_rng(1)
    mats = channel_mats(trained_convs)
    # never refresh after the first call: the whole run rests on warm-started iterations
    engine = SpectrumEngine(ops, "subspace", refresh_every=1000, oversample=4)
    # as the algorithms do: ask for the ranks chosen at the previous step (here, at step 0, the
    # reference's, so that the first basis is wide enough and no later call needs a re-solve)
    ranks = {}
    for n, m in mats.items():
        s_ref = ref_svd(m)[1]
        ranks.update({(n, p): ref_residual_rank(s_ref, p)[0] for p in PARTIAL_KS})
        ranks.update({(n, e): ref_energy_rank(s_ref, e)[0] for e in ENERGIES})
    near_ties = []
    for step in range(5):
        mats = drift(mats, rng)
        need = {n: max(ranks[(n, p)] for p in PARTIAL_KS + ENERGIES) for n in mats}
        spectra = engine.spectra(as_tensors(ops, mats), need)
        for n, spec in spectra.items():  # warm-started spectra are partial unless q covers the side
            assert spec.exact == (len(spec.s) == min(mats[n].shape)), (step, n)
        for n, m in mats.items():
            spec, s_ref = spectra[n], ref_svd(m)[1]
            for p in PARTIAL_KS:
                k_ref, margin = ref_residual_rank(s_ref, p)
                k = residual_rank(spec.s, p, spec.total_energy)
                check_rank(k, k_ref, margin, (step, n, p), near_ties)
                ranks[(n, p)] = k
                approx = ops.to_numpy(project_top(ops, ops.asarray(m), spec, k_ref))
                scale = np.linalg.norm(m.astype(np.float64))
                assert rel_err(approx, eckart_young(m, k_ref), scale) < APPROX_TOL, (step, n)
            for e in ENERGIES:
                r_ref, margin = ref_energy_rank(s_ref, e)
                r = energy_rank(spec.s, e, spec.total_energy)
                check_rank(r, r_ref, margin, (step, n, e), near_ties)
                ranks[(n, e)] = r
            lead = min(len(spec.s), 3)
            np.testing.assert_allclose(spec.s[:lead], s_ref[:lead], rtol=SUBSPACE_RTOL, err_msg=f"{step} {n}")
    assert len(near_ties) <= 4, near_ties
    # only the very first call solved exactly (once per distinct shape)
    assert engine.exact_solves == n_shapes(mats)


def test_subspace_refresh_every_triggers_exact_solves(neutral_ops, trained_convs):
    ops = neutral_ops
    mats = channel_mats(trained_convs)
    groups = n_shapes(mats)
    need = {n: 4 for n in mats}
    engine = SpectrumEngine(ops, "subspace", refresh_every=3, oversample=2)
    rng = np.random.default_rng(2)
    counts = []
    for call in range(4):
        mats = drift(mats, rng)
        engine.spectra(as_tensors(ops, mats), need)
        counts.append(engine.exact_solves)
    # exact solves on calls 0 and 3 — one per distinct shape each time
    assert counts == [groups, groups, groups, 2 * groups]
    # asking for more than the kept basis holds forces an exact solve on that call only (calls 4, 5)
    bigger = dict(need)
    bigger["layer3.2.conv2"] = 20       # the (64, 576) group; basis holds 4 + 2 columns
    engine.spectra(as_tensors(ops, mats), bigger)
    assert engine.exact_solves == 2 * groups + 1
    spec = engine.spectra(as_tensors(ops, mats), bigger)["layer3.2.conv2"]
    assert engine.exact_solves == 2 * groups + 1
    assert len(spec.s) >= 21
    # gram always solves exactly; exact counts one batched SVD per shape
    for method in ("gram", "exact"):
        eng = SpectrumEngine(ops, method, refresh_every=3)
        eng.spectra(as_tensors(ops, mats), need)
        assert eng.exact_solves == groups


def test_reset_after_a_jump_solves_exactly(neutral_ops, trained_convs):
    """A mask update moves the weights far more than one warm-started iteration can follow;
    after ``reset()`` the next call is an exact solve and the ranks are the full SVD's again."""
    ops = neutral_ops
    mats = channel_mats(trained_convs)
    need = {n: ref_residual_rank(ref_svd(m)[1], 0.1)[0] for n, m in mats.items()}
    engine = SpectrumEngine(ops, "subspace", refresh_every=50)
    engine.spectra(as_tensors(ops, mats), need)
    assert engine.exact_solves == n_shapes(mats)
    # magnitude pruning to 80 % over all layers: the jump
    flat = np.concatenate([np.abs(m).ravel() for m in mats.values()])
    thr = np.sort(flat)[int(0.8 * flat.size)]
    pruned = {n: np.where(np.abs(m) > thr, m, 0).astype(np.float32) for n, m in mats.items()}
    engine.reset()
    spectra = engine.spectra(as_tensors(ops, pruned), need)
    assert engine.exact_solves == 2 * n_shapes(mats)
    near_ties = []
    for n, m in pruned.items():
        s_ref = ref_svd(m)[1]
        k_ref, margin = ref_residual_rank(s_ref, 0.1)
        check_rank(residual_rank(spectra[n].s, 0.1, spectra[n].total_energy), k_ref, margin, n, near_ties)
        approx = ops.to_numpy(project_top(ops, ops.asarray(m), spectra[n], k_ref))
        assert rel_err(approx, eckart_young(m, k_ref), np.linalg.norm(m.astype(np.float64))) < APPROX_TOL, n
    assert len(near_ties) <= 1


def test_engine_rejects_bad_settings(neutral_ops):
    with pytest.raises(ConfigError, match="bar"):
        SpectrumEngine(neutral_ops, "bar")
    with pytest.raises(ConfigError):
        SpectrumEngine(neutral_ops, "gram", refresh_every=0)
    with pytest.raises(ConfigError):
        SpectrumEngine(neutral_ops, "gram", oversample=-1)


# ---------------------------------------------------------------- tall matrices (right side)
def tall_matrix(m=96, n=16, seed=3):
    """Like a 1×1 expansion conv (C_out=96 > C_in=16): a decaying, well-separated spectrum."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 2.0 * 0.75 ** np.arange(n)
    return ((u * s) @ v.T).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_tall_matrix_uses_the_right_side(neutral_ops, method):
    ops = neutral_ops
    m = tall_matrix()
    w = m.reshape(96, 16, 1, 1)   # a 1×1 conv's matrix view is (C_out, C_in): tall
    t = matrix_view(ops, ops.asarray(w))
    assert ops.shape(t) == (96, 16)
    u_ref, s_ref, vh_ref = ref_svd(m)
    engine = SpectrumEngine(ops, method, refresh_every=50)
    rng = np.random.default_rng(4)
    cur = m
    for _ in range(3):  # the subspace method: one exact call, then warm-started ones
        spec = engine.spectra({"expand": ops.asarray(cur)}, {"expand": 5})["expand"]
        u_ref, s_ref, vh_ref = ref_svd(cur)
        assert spec.side == "right"
        assert ops.shape(spec.basis)[0] == 16       # right singular vectors V (n × q)
        q = len(spec.s)
        basis = ops.to_numpy(spec.basis).astype(np.float64)
        # spans the leading right singular subspace: |<v_i, v_i_ref>| ≈ 1
        np.testing.assert_allclose(np.abs(np.sum(basis[:, :5] * vh_ref[:5].T, axis=0)), 1.0, atol=1e-4)
        np.testing.assert_allclose(spec.s[:5], s_ref[:5], rtol=SUBSPACE_RTOL)
        for k in (1, 3, 5):
            approx = ops.to_numpy(project_top(ops, ops.asarray(cur), spec, k))
            assert approx.shape == (96, 16)
            assert rel_err(approx, eckart_young(cur, k), np.linalg.norm(cur)) < 1e-5, k
            u, s, vh = (ops.to_numpy(x).astype(np.float64) for x in top_factors(ops, ops.asarray(cur), spec, k))
            assert u.shape == (96, k) and vh.shape == (k, 16)
            assert rel_err((u * s) @ vh, eckart_young(cur, k), np.linalg.norm(cur)) < 1e-5, k
            np.testing.assert_allclose(np.abs(np.sum(u * u_ref[:, :k], axis=0)), 1.0, atol=1e-4)
        assert q <= 16
        cur = drift({"x": cur}, rng)["x"]
