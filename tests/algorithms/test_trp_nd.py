"""TRP's nd scheme (network decoupling; prunekit/algorithms/trp.py, prunekit/decisions/spectrum.py,
backends/*/surgery.py): the per-filter projection and nuclear term of a step, the ND
decomposition into parallel pointwise + depthwise paths (fused into a 1x1 conv and a grouped
conv) on both backends, its outputs against the per-filter truncated model, and its settings.

Expectations are computed here in float64 (NumPy SVD of every filter as a (C_in, kh*kw)
matrix), never read from prunekit's own output.
"""

import numpy as np
import pytest

from prunekit.algorithms.trp import TRPConfig, TRPPruner, decomposition_factors, plan_decompositions
from prunekit.conformance.fixtures import ArrayHandle
from prunekit.decisions.flops import count_handle
from prunekit.decisions.selection import energy_rank
from prunekit.errors import ConfigError

#: decomposed vs truncated model, eval logits (two float32 convs instead of one): the stated bound
OUTPUT_ATOL = 1e-4


def filter_svd(w):
    co, ci, kh, kw = w.shape
    return np.linalg.svd(np.asarray(w, np.float64).reshape(co, ci, kh * kw), full_matrices=False)


def truncate_filters(w, ranks):
    """Every filter o of w truncated to ranks[o] terms (float64)."""
    u, s, vh = filter_svd(w)
    out = np.zeros(u.shape[:2] + vh.shape[2:])
    for o, r in enumerate(ranks):
        out[o] = (u[o, :, :r] * s[o, :r]) @ vh[o, :r]
    return out.reshape(w.shape)


def weights(seed=0):
    """Layers with low-rank filters, a full-rank one, an all-zero filter and a 5x5 kernel."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((8, 16, 3, 3))
    u, s, vh = filter_svd(a)
    s[:, 2:] *= 0.05                               # filters of (nearly) rank 2
    a = np.einsum("oik,ok,okx->oix", u, s, vh).reshape(a.shape)
    a[5] = 0.0                                     # an all-zero filter: rank 0, left as it is
    return {"a": a.astype(np.float32), "b": rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
            "c": rng.standard_normal((6, 4, 5, 5)).astype(np.float32)}


@pytest.mark.parametrize("rank_on", ["host", "device"])
def test_nd_step_projects_every_filter_to_its_energy_rank(rank_on):
    from prunekit.backends.torch import Ops

    ops = Ops()
    ws = weights()
    h = ArrayHandle(ops, ws)
    algo = TRPPruner(TRPConfig(energy=0.9, lam=1e-2, scheme="nd", rank_on=rank_on))
    algo.select_layers = lambda layers: list(layers)  # no stem in an ArrayHandle
    algo.bind(h, 10)
    algo.before_step(0)
    grads = algo.transform_gradients(0, {n: ops.zeros(w.shape) for n, w in ws.items()})
    for name, w in ws.items():
        u, s, vh = filter_svd(w)
        ranks = [energy_rank(x, 0.9) for x in s]
        got = ops.to_numpy(h.weight(name)).astype(np.float64)
        want = truncate_filters(w, ranks)
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), name
        for o, r in enumerate(ranks):           # each filter now has exactly its rank (checked on the weights)
            sv = np.linalg.svd(got[o].reshape(w.shape[1], -1), compute_uv=False)
            assert int(np.sum(sv > 1e-3 * max(sv.max(), 1e-12))) == r, (name, o)
        term = np.stack([u[o, :, :r] @ vh[o, :r] for o, r in enumerate(ranks)]).reshape(w.shape) * 1e-2
        np.testing.assert_allclose(ops.to_numpy(grads[name]), term, atol=1e-5)
        # the layer's rank: the largest filter rank, at most min(C_in, kh*kw) (the release's item_num)
        assert algo.ranks[name] == min(max(ranks), w.shape[1], w.shape[2] * w.shape[3])
    assert algo.ranks["a"] < algo.ranks["b"]
    assert np.all(ops.to_numpy(h.weight("a"))[5] == 0.0)


@pytest.mark.parametrize("backend_name", ["torch", "mindspore"])
def test_nd_decomposition_equals_the_truncated_model(backend_name):
    """Every 3x3 conv but the stem (strided ones included) decomposed at the per-filter energy
    0.85: K parallel pointwise+depthwise paths per layer; eval logits equal the model whose
    filters are truncated to K terms; parameters and MACs as the paths count them."""
    from prunekit.contract.backend import get_backend

    backend = get_backend(backend_name)
    h = backend.model_handle("resnet20", 10, 3, 16, seed=3)
    state = h.state_numpy()
    decs = plan_decompositions(h, "nd", threshold=None, energy=0.85)
    assert [d.layer for d in decs] == [l.name for l in TRPPruner().select_layers(h.layers)]
    truncated = dict(state)
    extra_params = extra_macs = 0
    for d in decs:
        w = state[f"{d.layer}.weight"]
        co, ci, kh, kw = w.shape
        _, s, _ = filter_svd(w)
        assert d.rank == min(max(energy_rank(x, 0.85) for x in s), ci, kh * kw)
        assert d.first.weight.shape == (d.rank * co, ci, 1, 1) and d.second.weight.shape == (co, d.rank, kh, kw)
        assert d.second.groups == co and d.second.stride == h.layer(d.layer).stride
        truncated[f"{d.layer}.weight"] = truncate_filters(w, [d.rank] * co).astype(np.float32)
        info = h.layer(d.layer)
        hw_in, hw_out = np.prod(info.input_hw), np.prod(info.output_hw)
        extra_params += d.rank * co * (ci + kh * kw) - w.size
        extra_macs += d.rank * co * (ci * hw_in + kh * kw * hw_out) - w.size * hw_out
    ref = backend.model_handle("resnet20", 10, 3, 16, seed=3)
    ref.load_state_numpy(truncated)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ref.predict(x)
    before = count_handle(h)
    new = backend.apply_decompositions(h, decs)
    got = new.predict(x)
    assert np.abs(want).max() > 0.1
    assert float(np.abs(got - want).max()) <= OUTPUT_ATOL
    after = count_handle(new)
    assert after["total_params"] - before["total_params"] == extra_params
    assert after["dense_macs"] - before["dense_macs"] == extra_macs
    assert new.state_numpy()["layer2.0.conv1.1.weight"].shape[1] == decs[6].rank


def test_nd_full_rank_decomposition_is_the_layer_and_paths_sum():
    """At full rank the decomposition computes the original conv (with its bias); the fused
    factors are the release's paths: path j of filter o is pointwise row o*K+j, grouped [o, j]."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    d = decomposition_factors(w, bias, (1, 1), (1, 1), "nd", rank=99)
    assert d.rank == 4                              # min(C_in, kh*kw)
    pw, gw = d.first.weight[:, :, 0, 0].astype(np.float64), d.second.weight.astype(np.float64)
    rebuilt = np.einsum("ojc,ojx->ocx", pw.reshape(6, 4, 4), gw.reshape(6, 4, 9)).reshape(w.shape)
    np.testing.assert_allclose(rebuilt, w, atol=1e-5)
    assert d.second.bias is bias and d.first.bias is None
    d2 = decomposition_factors(w, None, (1, 1), (1, 1), "nd", rank=2)
    rebuilt2 = np.einsum("ojc,ojx->ocx", d2.first.weight[:, :, 0, 0].reshape(6, 2, 4),
                         d2.second.weight.reshape(6, 2, 9)).reshape(w.shape)
    np.testing.assert_allclose(rebuilt2, truncate_filters(w, [2] * 6), atol=1e-5)


def test_nd_final_transform_reports_the_energy_rule():
    import prunekit.backends.torch as bt

    h = bt.model_handle("resnet20", 10, 3, 32, seed=0)
    algo = TRPPruner(TRPConfig(scheme="nd", nd_energy=0.5))
    algo.bind(h, 4)
    out = algo.final_transform(h, bt, None)
    sec = out.section
    assert sec["scheme"] == "nd" and sec["energy"] == 0.5 and sec["threshold"] is None
    assert set(sec["ranks"]) == {l.name for l in algo.layers}
    assert all(1 <= r <= 9 for r in sec["ranks"].values())
    assert sec["macs_after"] == count_handle(out.handle)["dense_macs"]
    from prunekit.app.report import build_report, format_report
    text = format_report(build_report(out.handle, extra={"decomposition": sec}))
    assert "decomposition (nd, 0.5 of each filter's energy)" in text


def test_nd_settings_refused():
    for bad in (dict(scheme="nd", threshold=0.1), dict(scheme="nd", spectrum="tracked"),
                dict(scheme="nd", spectrum="subspace"), dict(nd_energy=0.0), dict(nd_energy=1.5)):
        with pytest.raises(ConfigError):
            TRPConfig(**bad)
    with pytest.raises(ConfigError, match="nd_energy"):
        TRPConfig(scheme="nd", threshold=0.2)
    assert TRPConfig(scheme="nd").nd_energy == 0.85


def test_nd_run_reloads_on_both_backends(tmp_path):
    """A run folder with an nd decomposition (report + weights) rebuilds on each backend
    (prunekit.app.export.load_run: K·C_out rows in the first conv) and computes the same logits."""
    import json

    import prunekit.backends.torch as bt
    from prunekit.app.export import load_run
    from prunekit.contract.backend import get_backend

    h = bt.model_handle("resnet20", 10, 3, 32, seed=2)
    decs = plan_decompositions(h, "nd", threshold=None, energy=0.85)
    new = bt.apply_decompositions(h, decs)
    np.savez(tmp_path / "weights.npz", **new.state_numpy())
    report = {"model": "resnet20", "run": {"dataset": "cifar10", "backend": "torch"},
              "decomposition": {"scheme": "nd", "ranks": {d.layer: d.rank for d in decs}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    structure, state, _ = load_run(str(tmp_path))
    x = structure.example_input(2)
    want = new.predict(x)
    for name in ("torch", "mindspore"):
        got = structure.build(get_backend(name), state).predict(x)
        assert float(np.abs(got - want).max()) <= OUTPUT_ATOL, name
