"""The settings that give the authors' released behaviour where prunekit's default departs from
it (docs/DECISIONS.md, "Departures from the released code"): each test fails if its setting is
ignored. References are written here (NumPy, PyTorch autograd), never read from prunekit's output.
"""
import math

import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.dsa import alpha_gradient, group_importance, keep_probabilities, solve_log_beta1
from prunekit.decisions import pai_scores as pai
from prunekit.decisions.schedules import SparsitySchedule
from prunekit.errors import ConfigError

torch = pytest.importorskip("torch")


def _torch_handle(model="resnet20", seed=0):
    from prunekit.contract.backend import get_backend

    c, s = (1, 28) if model == "mnist_cnn" else (3, 32)
    return get_backend("torch").model_handle(model, 10, c, s, seed=seed)


def _batch(h, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + tuple(h.input_shape)).astype(np.float32), rng.integers(0, 10, n)


# ------------------------------------------------------------------------------------------ RPG
def test_rpg_density_lag_runs_the_exponential_schedule_one_update_behind():
    h = _torch_handle("mnist_cnn")
    steps = {lag: make_algorithm("rpg", sparsity=0.9, frequency=10, end_fraction=1.0, density_lag=lag).bind(h, 101)
             for lag in (0, 1)}
    d = 0.1
    # the release: update u (1-based) keeps D^((u-1)/U); prunekit's default D^(u/U); both D at the end
    assert steps[1].schedule.sparsity_at(10) == 0.0
    assert steps[0].schedule.sparsity_at(10) == pytest.approx(1 - d ** (1 / 10))
    assert steps[1].schedule.sparsity_at(30) == pytest.approx(1 - d ** (2 / 10))
    assert steps[0].schedule.sparsity_at(100) == steps[1].schedule.sparsity_at(100) == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="density_lag"):
        make_algorithm("rpg", density_lag=-1)
    with pytest.raises(ConfigError, match="lag"):
        SparsitySchedule(0.5, kind="exponential", lag=-1)


def _orthogonal_conv(shape, seed):
    """A conv weight whose matrix view has equal singular values (all 1)."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((max(rows, cols), min(rows, cols))))
    return (q if rows >= cols else q.T).reshape(shape).astype(np.float32)


PARTIAL_K = 0.015


def _rpg_on_mnist_cnn(**settings):
    h = _torch_handle("mnist_cnn")
    state = h.state_numpy()
    # conv1's 32 x 25 matrix with 25 equal singular values: at partial_k 0.015 the residual 0 of
    # k = 25 (full rank, distance 0.015) beats 1/25 = 0.04 of k = 24 (distance 0.025)
    state["conv1.weight"] = _orthogonal_conv((32, 1, 5, 5), 0)
    h.load_state_numpy(state)
    algo = make_algorithm("rpg", partial_k=PARTIAL_K, spectrum="exact", rank_on="host", **settings).bind(h, 10)
    return h, algo


def _np(h, t):
    return np.asarray(h.ops.to_numpy(t), dtype=np.float64)


def test_rpg_rank_below_full_keeps_a_term_on_a_full_rank_fit():
    h, default = _rpg_on_mnist_cnn()
    terms = default.rank_gradients()
    assert default.ranks["conv1"] == 25 and "conv1" in terms  # k = full rank: R = 0, zero gradient
    assert np.abs(_np(h, terms["conv1"])).max() < 1e-6
    h, capped = _rpg_on_mnist_cnn(rank_below_full=True)
    terms = capped.rank_gradients()
    assert capped.ranks["conv1"] == 24
    # ℓ = −‖R‖² with ‖R‖² = 1/25 of the energy: its gradient is not zero
    assert np.abs(_np(h, terms["conv1"])).max() > 1e-4
    assert capped.rank_loss == pytest.approx(-(1 / 25 + _residual(h, "conv2", PARTIAL_K, cap=63)) / 2, rel=1e-4)


def _residual(h, name, partial_k, cap=None):
    from prunekit.decisions.selection import residual_rank

    w = _np(h, h.weight(name))
    s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
    e = float(np.sum(s * s))
    k = residual_rank(s, partial_k, e, max_rank=cap)
    return 1.0 - float(np.sum(s[:k] ** 2)) / e


def test_rpg_rank_mean_nonzero_averages_over_the_layers_with_a_term():
    h, every = _rpg_on_mnist_cnn()
    g_all = _np(h, every.rank_gradients()["conv2"])
    _, nonzero = _rpg_on_mnist_cnn(rank_mean="nonzero")
    g_nz = _np(h, nonzero.rank_gradients()["conv2"])
    # conv1's term is zero (k = full rank): the release divides by 1 layer, the default by 2
    np.testing.assert_allclose(g_nz, 2.0 * g_all, rtol=1e-5, atol=1e-12)
    assert nonzero.rank_loss == pytest.approx(2.0 * every.rank_loss, rel=1e-6)
    with pytest.raises(ConfigError, match="rank_mean"):
        make_algorithm("rpg", rank_mean="some")


def test_rpg_reports_the_ranks_of_the_final_weights():
    h, algo = _rpg_on_mnist_cnn()
    algo.rank_gradients()
    assert algo.ranks["conv1"] == 25
    # the weights move after the last rank computation (training, the final mask update)
    state = h.state_numpy()
    w = state["conv2.weight"]
    state["conv2.weight"] = (w * (np.arange(w.shape[0]) < 4)[:, None, None, None]).astype(np.float32)
    state["conv1.weight"] = np.random.default_rng(1).standard_normal((32, 1, 5, 5)).astype(np.float32)
    h.load_state_numpy(state)
    algo.current_sparsity = algo.config.sparsity  # no final mask update: the ranks alone must follow
    algo.finish()
    for name in ("conv1", "conv2"):
        w = _np(h, h.weight(name))
        s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
        e = s ** 2 / np.sum(s ** 2)
        dist = [abs(e[k:].sum() - PARTIAL_K) for k in range(len(s) + 1)]
        expected = max(k for k, v in enumerate(dist) if v <= min(dist) + 1e-9)
        if name == "conv1":
            assert expected != 25  # the stale rank would fail
        assert algo.ranks[name] == expected


# ------------------------------------------------------------------------------------------ TRP
def test_trp_threshold_is_one_checked_setting():
    from prunekit.app.job import RunConfig
    from prunekit.contract.backend import get_backend

    for bad in (-0.1, 0.0, float("inf")):
        with pytest.raises(ConfigError, match="threshold"):
            make_algorithm("trp", threshold=bad)
        with pytest.raises(ConfigError, match="threshold"):
            RunConfig(algorithm="trp", decompose_threshold=bad).validate()
    # --decompose-threshold and --set threshold are the same setting
    assert RunConfig(algorithm="trp", decompose_threshold=0.3).algorithm_kwargs()["config"].threshold == 0.3
    assert RunConfig(algorithm="trp", params={"threshold": 0.3}).algorithm_kwargs()["config"].threshold == 0.3
    with pytest.raises(ConfigError, match="same setting"):
        RunConfig(algorithm="trp", decompose_threshold=0.2, params={"threshold": 0.3}).validate()
    with pytest.raises(ConfigError, match="decompose_threshold"):
        RunConfig(algorithm="rpg", decompose_threshold=0.2).validate()
    # the decomposition keeps the singular values >= the config's threshold (the job passes it)
    ranks = {}
    for t in (0.05, 0.5):
        h = _torch_handle("resnet20")
        algo = make_algorithm("trp", threshold=t).bind(h, 1)
        section = algo.final_transform(h, get_backend("torch"), None).section
        assert section["threshold"] == t
        ranks[t] = section["ranks"]
    layer = next(iter(ranks[0.05]))
    w = _torch_handle("resnet20").state_numpy()[f"{layer}.weight"].astype(np.float64)  # (the decomposed handle changed)
    s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
    assert [ranks[t][layer] for t in (0.05, 0.5)] == [max(1, int(np.sum(s >= t))) for t in (0.05, 0.5)]


# ------------------------------------------------------------------------------------ PreCropping
def test_precrop_bn_mode_eval_scores_snip_with_running_statistics():
    import torch.nn.functional as F

    h = _torch_handle("resnet20")
    x, y = _batch(h)
    got = {}
    for mode in ("train", "eval"):
        algo = make_algorithm("precrop", score="snip", bn_mode=mode)
        algo.score(h, [(x, y)])
        got[mode] = algo.scores
    ref = _torch_handle("resnet20")
    ref.model.eval()
    names = [l.name for l in algo.layers]
    ws = [ref.module(n).weight for n in names]
    grads = torch.autograd.grad(F.cross_entropy(ref.model(torch.as_tensor(x)), torch.as_tensor(y)), ws)
    for n, w, g in zip(names, ws, grads):
        np.testing.assert_allclose(got["eval"][n], (w * g).abs().detach().numpy(), rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(got["train"][n], got["eval"][n], rtol=1e-3) for n in names)
    with pytest.raises(ConfigError, match="bn_mode"):
        make_algorithm("precrop", score="synflow", bn_mode="train")


def test_precrop_round_rule_reference_counts_like_synaptic_flow(monkeypatch):
    assert pai.round_keep(1000, 100, 1, 100, "nearest") == 977    # round(1000 · 0.1^0.01) = round(977.24)
    assert pai.round_keep(1000, 100, 1, 100, "reference") == 978  # 1000 − int(22.76)
    assert pai.round_keep(1000, 100, 100, 100, "reference") == 100
    counts = []
    real = pai.global_topk_masks

    def record(ops, scores, k):
        counts.append(k)
        return real(ops, scores, k)

    monkeypatch.setattr(pai, "global_topk_masks", record)
    h = _torch_handle("mnist_cnn")
    algo = make_algorithm("precrop", score="synflow", rounds=3, sparsity=0.9, round_rule="reference")
    algo.score(h)
    total = sum(l.numel for l in algo.layers)
    keep = counts[-1]
    assert counts[:2] == [total - int((1 - (keep / total) ** (t / 3)) * total) for t in (1, 2)]
    with pytest.raises(ConfigError, match="round_rule"):
        make_algorithm("precrop", round_rule="floor")


def test_precrop_reinit_linear_scores_grasp_with_redrawn_linear_weights():
    h = _torch_handle("resnet20")
    x, y = _batch(h)
    before = h.state_numpy()
    names = [l.name for l in make_algorithm("precrop").select_layers(h.layers)]
    algo = make_algorithm("precrop", score="grasp", reinit_linear=True)
    algo.score(h, [(x, y)], seed=3)
    after = h.state_numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # scored on the redraw, restored
    # reference: the linear layer redrawn Xavier-normal from the same generator, then plain GraSP
    rng = np.random.default_rng(3)
    fc = next(l for l in h.layers if l.kind == "linear")
    fan_out, fan_in = fc.weight_shape
    state = dict(before)
    state[f"{fc.name}.weight"] = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)),
                                            size=fc.weight_shape).astype(np.float32)
    h.load_state_numpy(state)
    ref = pai.grasp_scores(h, names, [(x, y)])
    for n in names:
        np.testing.assert_allclose(algo.scores[n], h.ops.to_numpy(ref[n]), rtol=1e-4, atol=1e-12)
    with pytest.raises(ConfigError, match="reinit_linear"):
        make_algorithm("precrop", score="snip", reinit_linear=True)


# ------------------------------------------------------------------------------------------ DSA
def test_dsa_capped_gradient_keeps_the_capped_channels_weight():
    log_b = np.log(np.linspace(0.1, 1.0, 12))
    t = solve_log_beta1(log_b, 0.99)
    p, ds = keep_probabilities(log_b, t)
    _, ds_release = keep_probabilities(log_b, t, capped_gradient=True)
    capped = p >= 1.0
    assert capped.any() and not capped.all()
    s = 1.0 / (1.0 + np.exp(-(log_b - t)))
    np.testing.assert_allclose(ds_release, s * (1 - s), rtol=1e-12)
    assert np.all(ds[capped] == 0.0)
    g = np.random.default_rng(0).standard_normal(12)
    assert alpha_gradient(g, ds_release) == pytest.approx(12 * np.sum(g * s * (1 - s)) / np.sum(s * (1 - s)))
    # the setting reaches the algorithm's probabilities
    h = _torch_handle("resnet20")
    rng = np.random.default_rng(0)
    h.load_state_numpy({k: (rng.uniform(0.1, 1.0, v.shape).astype(np.float32) if k.endswith(".weight") and v.ndim == 1
                            else v) for k, v in h.state_numpy().items()})
    algo = make_algorithm("dsa", capped_gradient=True).bind(h, 10)
    algo.alpha = np.where(algo.searchable, 0.99, algo.alpha)
    probs = algo.probabilities(algo.importance())
    assert any(np.any((p >= 1.0) & (d > 0)) for p, d, _ in probs.values())


def test_dsa_importance_primal_reads_the_groups_first_batchnorm(monkeypatch):
    state = {"a.weight": np.array([1.0, -4.0]), "b.weight": np.array([3.0, 0.0])}
    np.testing.assert_array_equal(group_importance(state, ("a", "b")), [2.0, 2.0])
    np.testing.assert_array_equal(group_importance(state, ("a", "b"), "primal"), [1.0, 4.0])
    from prunekit.algorithms import dsa

    rules = []
    real = dsa.group_importance
    monkeypatch.setattr(dsa, "group_importance", lambda s, n, rule="mean", group=None: rules.append(rule) or real(s, n, rule, group))
    make_algorithm("dsa", importance="primal").bind(_torch_handle("resnet20"), 10).importance()
    assert rules and set(rules) == {"primal"}
    with pytest.raises(ConfigError, match="importance"):
        make_algorithm("dsa", importance="sum")
