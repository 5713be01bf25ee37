"""TRP (prunekit/algorithms/trp.py, backends/torch/surgery.py): which
layers it works on, the projection and the nuclear-norm term of a training step, ``every``,
the final decomposition into two convs (both schemes, strided convs included) with parameter and
MAC counts, the rank choices, and configuration errors.

Expectations are computed here in float64 (NumPy SVD) from ALGORITHMS.md §2, never read from
prunekit's own output.
"""

import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.trp import TRPConfig, TRPPruner, choose_rank, decomposition_factors, plan_decompositions
from prunekit.errors import ConfigError, ModelError
from prunekit.decisions.flops import count_model

torch = pytest.importorskip("torch")

#: decomposed vs truncated model, eval logits: two float32 convs in a row instead of one
#: reorder the sums (relative ~1e-6 of logits of order 10); 1e-4 is the stated bound.
OUTPUT_ATOL = 1e-4
#: projected weights vs NumPy's rank-r truncation, ‖·‖_F relative: float32 Gram spectra (see
#: test_spectrum.py's tolerances) give ~1e-5; a wrong subspace or rank gives > 1e-2.
PROJ_RTOL = 1e-3








@pytest.fixture(scope="module")
def cifar():
    from prunekit.app import data
    try:
        ds = data.load_dataset("cifar10", train_limit=256, test_limit=10)
    except Exception as e:
        pytest.skip(f"CIFAR-10 unavailable: {e}")
    train = [(x, y) for x, y in ds.batches("train", 16, seed=0)]
    test_x, _ = next(iter(ds.batches("test", 10)))
    return train, test_x


def trained_handle(backend, state):
    h = backend.model_handle("resnet20")
    h.load_state_numpy(state)
    return h


# ---------------------------------------------------------------- references (float64)
def view(w, scheme):
    co, ci, kh, kw = w.shape
    w = np.asarray(w, np.float64)
    return w.reshape(co, -1) if scheme == "channel" else w.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)


def unview(m, shape, scheme):
    co, ci, kh, kw = shape
    return m.reshape(shape) if scheme == "channel" else m.reshape(ci, kh, co, kw).transpose(2, 0, 1, 3)


def ref_energy_rank(s, energy):
    e = np.asarray(s, np.float64) ** 2
    return int(np.argmax(np.cumsum(e) / e.sum() >= energy)) + 1


def truncate(w, r, scheme):
    u, s, vh = np.linalg.svd(view(w, scheme), full_matrices=False)
    return unview((u[:, :r] * s[:r]) @ vh[:r], w.shape, scheme)


# ---------------------------------------------------------------- layer selection
def test_layer_selection_resnet20_and_mobilenetv2():
    from prunekit.backends.torch import model_handle
    h = model_handle("resnet20")
    chosen = [l.name for l in TRPPruner().select_layers(h.layers)]
    convs = [l.name for l in h.layers if l.kind == "conv"]
    assert chosen == convs[1:] and len(chosen) == 18              # every 3×3 conv but the stem
    assert "conv1" not in chosen and "fc" not in chosen
    m = model_handle("mobilenetv2")
    picked = TRPPruner().select_layers(m.layers)
    # its 3×3 convs are the stem and depthwise ones; the rest are 1×1 or linear: nothing qualifies
    assert picked == []
    assert any(l.kind == "conv" and l.kernel_size == (3, 3) and l.groups > 1 for l in m.layers)
    assert any(l.kind == "conv" and l.kernel_size == (1, 1) for l in m.layers)
    with pytest.raises(ModelError):
        TRPPruner().bind(m, total_steps=10)
    v = model_handle("vgg16")
    v_convs = [l for l in v.layers if l.kind == "conv"]
    assert [l.name for l in TRPPruner().select_layers(v.layers)] == [l.name for l in v_convs[1:]]


# ---------------------------------------------------------------- a training step
class StepSpy:
    """Records the weights around TRPPruner.before_step (where the projection happens) and the
    gradients around TRPPruner.transform_gradients (where the nuclear term is added)."""

    def __init__(self, alg):
        self.calls = []
        orig, orig_before = alg.transform_gradients, alg.before_step
        weights = {}

        def before_step(step):
            weights["before"] = alg.handle.weights_numpy()
            orig_before(step)
            weights["after"] = alg.handle.weights_numpy()

        def transform_gradients(step, grads):
            ops = alg.ops
            before = weights["before"]
            g_in = {n: ops.to_numpy(g).astype(np.float64) for n, g in grads.items()}
            out = orig(step, grads)
            after = weights["after"]
            np.testing.assert_array_equal(alg.handle.weights_numpy()[alg.layers[0].name], after[alg.layers[0].name])
            g_out = {n: ops.to_numpy(g).astype(np.float64) for n, g in out.items()}
            self.calls.append((step, before, after, g_in, g_out, dict(alg.ranks)))
            return out

        alg.transform_gradients = transform_gradients
        alg.before_step = before_step


def one_step(backend, state, batch, **config):
    h = trained_handle(backend, state)
    alg = make_algorithm("trp", **config)
    trainer = backend.Trainer(h, alg, optimizer="sgd", lr=0.01, total_steps=4, lr_schedule="constant")
    spy = StepSpy(alg)
    trainer.train_step(*batch)
    return h, alg, spy.calls[0]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_step_projects_to_the_energy_rank_and_adds_the_nuclear_term(backend, trained_state, cifar, scheme):
    energy, lam = 0.9, 3e-4
    batch = cifar[0][0]
    h, alg, (_, before, after, g_in, g_out, ranks) = one_step(backend, trained_state, batch, energy=energy, lam=lam,
                                                              scheme=scheme)
    # the same step with λ = 0 (one scheme is enough: this costs a second model and compile)
    zero = None
    if scheme == "channel":
        zero = one_step(backend, trained_state, batch, energy=energy, lam=0.0, scheme=scheme)[2]
        _, before0, after0, g_in0, g_out0, ranks0 = zero
        assert ranks0 == ranks
    layers = [l.name for l in alg.layers]
    assert len(layers) == 18 and set(ranks) == set(layers)
    assert alg.plan().ranks == ranks and alg.plan().meta["scheme"] == scheme
    projected = 0
    for n in layers:
        w = before[n]
        m = view(w, scheme)
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        r = ref_energy_rank(s, energy)
        assert ranks[n] == r, (n, ranks[n], r)
        assert 1 <= r < min(m.shape), n                              # trained: a real truncation
        p = view(after[n], scheme)
        sp = np.linalg.svd(p, compute_uv=False)
        # numerical rank r: what lies beyond is float32 noise
        assert sp[r - 1] > 1e-3 * sp[0] and (r == len(sp) or sp[r] < 1e-5 * sp[0]), (n, r, sp[r - 1:r + 1] / sp[0])
        assert np.sum(sp ** 2) >= (energy - 1e-6) * np.sum(s ** 2), n  # keeps >= e of the energy
        ref = (u[:, :r] * s[:r]) @ vh[:r]
        assert np.linalg.norm(p - ref) <= PROJ_RTOL * np.linalg.norm(ref), n
        projected += 1
        # the gradient: + λ·U_r V_rᵀ (nuclear-norm sub-gradient), nothing else
        nuc = unview(u[:, :r] @ vh[:r], w.shape, scheme)
        bound = 1e-3 * lam * np.linalg.norm(nuc) + 1e-6 * np.linalg.norm(g_in[n])
        assert np.linalg.norm(g_out[n] - g_in[n] - lam * nuc) <= bound, n
        if zero:
            np.testing.assert_array_equal(after0[n], after[n])       # λ does not change the projection
            np.testing.assert_array_equal(g_in0[n], g_in[n])         # same batch, same weights
            np.testing.assert_array_equal(g_out0[n], g_in0[n])       # λ = 0: gradient untouched
            assert np.linalg.norm(g_out[n] - g_out0[n] - lam * nuc) <= bound, n
    # layers TRP does not own are left alone
    for n in ("conv1", "fc"):
        np.testing.assert_array_equal(after[n], before[n])
        np.testing.assert_array_equal(g_out.get(n, g_in[n]), g_in[n])
    assert projected == 18


def test_every_m_only_acts_on_multiples_of_m(backend, trained_state, cifar):
    train, _ = cifar
    h = trained_handle(backend, trained_state)
    alg = make_algorithm("trp", every=2, energy=0.8, lam=1e-3, spectrum="subspace", refresh_every=100)
    trainer = backend.Trainer(h, alg, optimizer="sgd", lr=0.01, total_steps=5, lr_schedule="constant")
    spy = StepSpy(alg)
    for t in range(5):
        trainer.train_step(*train[t % len(train)])
    acted = []
    for step, before, after, g_in, g_out, ranks in spy.calls:
        changed = any(not np.array_equal(before[n], after[n]) for n in before) or \
            any(not np.array_equal(g_in[n], g_out[n]) for n in g_in)
        if changed:
            acted.append(step)
            for l in alg.layers:   # and where it acts, the ranks are the float64 SVD's
                assert ranks[l.name] == ref_energy_rank(np.linalg.svd(view(before[l.name], "channel"),
                                                                      compute_uv=False), 0.8), (step, l.name)
    assert [c[0] for c in spy.calls] == list(range(5))
    assert acted == [0, 2, 4]
    # subspace method (3 calls): an exact solve per distinct shape on the first call, and at most
    # one more when the ranks first become known (the first call could only ask for rank 1)
    shapes = len({l.weight_shape for l in alg.layers})
    assert shapes == 5 and shapes <= alg.engine.exact_solves <= 2 * shapes


# ---------------------------------------------------------------- final decomposition (PyTorch)
def analytic_counts(h, ranks, scheme):
    """(params, MACs) of the decomposed convs, from ranks and shapes only."""
    params = macs = 0
    for name, r in ranks.items():
        l = h.layer(name)
        co, ci, kh, kw = l.weight_shape
        ho, wo = l.output_hw
        if scheme == "channel":
            p1, p2 = r * ci * kh * kw, co * r
            m1, m2 = p1 * ho * wo, p2 * ho * wo
        else:  # first conv kh×1 (vertical stride and padding only): full input width
            win = l.input_hw[1]
            p1, p2 = r * ci * kh, co * r * kw
            m1, m2 = p1 * ho * win, p2 * ho * wo
        params += p1 + p2
        macs += m1 + m2
    return params, macs


def logits(h, x):
    h.model.eval()
    with torch.no_grad():
        return h.model(torch.from_numpy(x)).numpy().astype(np.float64)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("choice", [dict(), dict(energy=0.6), dict(rank=3)])
def test_decomposition_matches_truncated_model_and_counts(trained_state, cifar, scheme, choice):
    from prunekit.backends.torch import apply_decompositions, model_handle
    _, x = cifar
    h = model_handle("resnet20")
    h.load_state_numpy(trained_state)
    before = count_model(h.layers, h.weights_numpy(), h.state_numpy())
    targets = [l.name for l in h.layers[1:-1]]
    # the reference: the same model with each weight replaced by its truncation at the rank the
    # rule picks on the float64 spectrum
    ranks, truncated = {}, dict(trained_state)
    for n in targets:
        s = np.linalg.svd(view(trained_state[f"{n}.weight"], scheme), compute_uv=False)
        if "rank" in choice:
            r = choice["rank"]
        elif "energy" in choice:
            r = ref_energy_rank(s, choice["energy"])
        else:
            r = max(1, int(np.sum(s >= 0.05)))
        ranks[n] = r
        truncated[f"{n}.weight"] = truncate(trained_state[f"{n}.weight"], r, scheme).astype(np.float32)
    t = model_handle("resnet20")
    t.load_state_numpy(truncated)
    want = logits(t, x)
    full = logits(h, x)

    decs = plan_decompositions(h, scheme, **choice)
    assert [d.layer for d in decs] == targets
    assert {d.layer: d.rank for d in decs} == ranks
    assert all(d.scheme == scheme for d in decs)
    strided = [d for d in decs if h.layer(d.layer).stride == (2, 2)]
    assert [d.layer for d in strided] == ["layer2.0.conv1", "layer3.0.conv1"]
    for d in strided:
        assert d.first.stride == ((2, 2) if scheme == "channel" else (2, 1))
        assert d.second.stride == ((1, 1) if scheme == "channel" else (1, 2))
    if "rank" not in choice:
        assert len(set(ranks.values())) >= 3
    new = apply_decompositions(h, decs)
    got = logits(new, x)
    assert np.abs(got - want).max() <= OUTPUT_ATOL, np.abs(got - want).max()
    if choice:   # (not a vacuous comparison: truncation does change the outputs)
        assert np.abs(want - full).max() > 100 * OUTPUT_ATOL

    # the new layers: <name>.0 and <name>.1 with the factor shapes
    names = [l.name for l in new.layers]
    for n, r in ranks.items():
        co, ci, kh, kw = h.layer(n).weight_shape
        assert n not in names
        first, second = new.layer(f"{n}.0"), new.layer(f"{n}.1")
        if scheme == "channel":
            assert first.weight_shape == (r, ci, kh, kw) and second.weight_shape == (co, r, 1, 1)
        else:
            assert first.weight_shape == (r, ci, kh, 1) and second.weight_shape == (co, r, 1, kw)
        assert second.output_hw == h.layer(n).output_hw
    # parameters and MACs after, measured on the new model, equal the analytic counts
    after = count_model(new.layers, new.weights_numpy(), new.state_numpy())
    old_params = sum(h.layer(n).numel for n in ranks)
    old_macs = sum(h.layer(n).numel * h.layer(n).output_hw[0] * h.layer(n).output_hw[1] for n in ranks)
    p, m = analytic_counts(h, ranks, scheme)
    assert after["total_params"] == before["total_params"] - old_params + p
    assert after["dense_macs"] == before["dense_macs"] - old_macs + m
    assert after["prunable_params"] == before["prunable_params"] - old_params + p
    assert before["dense_macs"] == 40_550_400 + 640    # ResNet-20's 41M MACs (convs + fc)
    if choice.get("rank") == 3:
        assert after["dense_macs"] < before["dense_macs"] / 3


def test_decomposition_of_a_strided_conv_with_bias():
    """A strided, padded conv with a bias, in isolation (stride on the first factor)."""
    import torch.nn as nn
    from prunekit.backends.torch import apply_decompositions
    from prunekit.backends.torch.layers import TorchModelHandle
    rng = np.random.default_rng(5)
    for scheme in ("channel", "spatial"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(6, 10, (3, 5), stride=(2, 3), padding=(1, 2), bias=True), nn.ReLU(),
                              nn.Flatten(), nn.Linear(10 * 6 * 4, 3))
        h = TorchModelHandle(model, (6, 11, 12), "toy")
        x = rng.standard_normal((4, 6, 11, 12)).astype(np.float32)
        w = h.weights_numpy()["0"]
        r = 4
        ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(truncate(w, r, scheme)),
                                         model[0].bias.detach().double(), stride=(2, 3), padding=(1, 2)).numpy()
        decs = plan_decompositions(h, scheme, rank=r, layers=["0"])
        new = apply_decompositions(h, decs)
        with torch.no_grad():
            got = model[0](torch.from_numpy(x)).numpy()
        assert isinstance(model[0], nn.Sequential)
        assert got.shape == ref.shape == (4, 10, 6, 4)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert new.layer("0.1").has_bias and not new.layer("0.0").has_bias


# ---------------------------------------------------------------- rank choices and errors
def test_choose_rank():
    s = np.array([3.0, 2.0, 1.0, 0.5, 0.05, 0.049, 0.0])
    e = s ** 2 / np.sum(s ** 2)   # 0.631, 0.912, 0.982, ... cumulatively
    assert choose_rank(s) == 5                          # σ >= 0.05 (the release's threshold), inclusive
    assert choose_rank(s, threshold=0.5) == 4
    assert choose_rank(s, threshold=100.0) == 1         # never below one
    assert choose_rank(s, threshold=0.0) == 7
    assert choose_rank(s, rank=3) == 3
    assert choose_rank(s, rank=0) == 1 and choose_rank(s, rank=99) == 7
    assert choose_rank(s, energy=0.5) == 1
    assert np.cumsum(e)[1] > 0.9 and choose_rank(s, energy=0.9) == 2
    assert choose_rank(s, energy=float(np.cumsum(e)[2])) == 3   # met exactly: the first index meeting it
    assert choose_rank(s, energy=1.0) == 6              # the zero value adds no energy
    # precedence: a fixed rank, then an energy, then the threshold
    assert choose_rank(s, threshold=0.5, rank=2, energy=0.99) == 2
    assert choose_rank(s, threshold=0.5, energy=0.99) == 4
    with pytest.raises(ConfigError):
        choose_rank(s, energy=0.0)


def test_bad_config():
    for bad in (dict(scheme="diagonal"), dict(energy=0), dict(energy=1.5), dict(lam=-1), dict(every=0),
                dict(spectrum="bar")):
        with pytest.raises(ConfigError):
            make_algorithm("trp", **bad)
        with pytest.raises(ConfigError):
            TRPConfig(**bad)
    with pytest.raises(ConfigError, match="diagonal"):
        make_algorithm("trp", scheme="diagonal")
    w = np.ones((4, 4, 3, 3), np.float32)
    with pytest.raises(ConfigError, match="diagonal"):
        decomposition_factors(w, None, (1, 1), (1, 1), scheme="diagonal")
    from prunekit.backends.torch import model_handle
    with pytest.raises(ConfigError):
        plan_decompositions(model_handle("resnet20"), scheme="nc")  # "nd" is a scheme now (test_trp_nd.py)
    c = TRPConfig()
    assert (c.energy, c.lam, c.every, c.scheme, c.threshold) == (0.9, 3e-4, 1, "channel", 0.05)
