"""RPG (prunekit/algorithms/rpg.py): the closed-form rank gradient against autograd, the ranks,
the exponential schedule and RigL drop/grow during training on real CIFAR-10, the release's
semantics (skipped optimizer steps), a plain PruningSession loop, and configuration errors.

Expectations are computed here in float64 (NumPy SVD, torch autograd on float64 copies of the
weights) from ALGORITHMS.md §1, never read from prunekit's output.
"""
import math

import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.rpg import RPGConfig, RPGPruner
from prunekit.errors import ConfigError
from references import keep, ref_topk

torch = pytest.importorskip("torch")

#: closed-form vs autograd rank gradient, per layer: ‖g − g_ref‖_F <= GRAD_RTOL ‖g_ref‖_F. The
#: implementation works in float32 (relative rounding ~1e-7, amplified by the projection onto a
#: subspace whose k-th gap is finite); 1e-3 is far below what a wrong k, a missing chain-rule
#: term through the normalisation (≈ ‖R‖² relative) or a wrong 1/L scale would give.
GRAD_RTOL = 1e-3
STEPS, FREQ, TARGET, BATCH = 11, 3, 0.9, 16
T_END = math.floor(0.8 * (STEPS - 1))          # release: masks move until 0.8 of training
N_UPDATES = math.ceil(T_END / FREQ)
UPDATES = [t for t in range(1, T_END + 1) if t % FREQ == 0 or t == T_END]








@pytest.fixture(scope="module")
def cifar():
    from prunekit.app import data
    try:
        ds = data.load_dataset("cifar10", train_limit=256, test_limit=10)
    except Exception as e:  # data set not available here
        pytest.skip(f"CIFAR-10 unavailable: {e}")
    return [(x, y) for x, y in ds.batches("train", BATCH, seed=0)]


def trained_handle(backend, state):
    h = backend.model_handle("resnet20")
    h.load_state_numpy(state)
    return h


# ---------------------------------------------------------------- references (float64)
def ref_residual_rank(s, partial_k):
    e = np.asarray(s, np.float64) ** 2
    dists = [abs(e[k:].sum() / e.sum() - partial_k) for k in range(len(e) + 1)]
    best = min(dists)
    return max(k for k, d in enumerate(dists) if d == best)


def ref_rank_gradients(convs, partial_k):
    """∂/∂W of mean over conv layers of −‖Mn − Ŵ‖²_F, Ŵ the (constant) best rank-k approximation
    of Mn = M/‖M‖_F: torch autograd on float64, Ŵ from NumPy's SVD. Returns (grads, ranks, loss)."""
    L = len(convs)
    grads, ranks, loss = {}, {}, 0.0
    for name, w in convs.items():
        m = np.asarray(w, np.float64).reshape(w.shape[0], -1)
        nrm = np.linalg.norm(m)
        if nrm == 0:
            ranks[name] = 0
            continue
        u, s, vh = np.linalg.svd(m / nrm, full_matrices=False)
        k = ref_residual_rank(s, partial_k)
        w_hat = torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k])
        mt = torch.tensor(m, requires_grad=True)
        ell = -((mt / torch.linalg.norm(mt) - w_hat) ** 2).sum() / L
        ell.backward()
        grads[name] = mt.grad.numpy().reshape(w.shape)
        ranks[name] = k
        loss += float(ell.detach())
    return grads, ranks, loss


def conv_weights(h):
    return {l.name: h.ops.to_numpy(h.weight(l.name)) for l in h.layers if l.kind == "conv"}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- the rank term
@pytest.mark.parametrize("spectrum", ["exact", "gram", "subspace"])
def test_rank_gradient_matches_autograd(backend, trained_state, spectrum):
    h = trained_handle(backend, trained_state)
    convs = [l.name for l in h.layers if l.kind == "conv"]
    weights = conv_weights(h)
    for partial_k in (0.1, 0.2):
        alg = RPGPruner(partial_k=partial_k, spectrum=spectrum).bind(h, total_steps=10)
        ref, ref_ranks, ref_loss = ref_rank_gradients(weights, partial_k)
        grads = alg.rank_gradients()
        assert len(convs) == 19 and set(grads) == set(convs)           # stem included
        assert "fc" not in grads and "fc" not in alg.ranks            # linear layers: no rank term
        assert alg.ranks == ref_ranks, partial_k
        assert len(set(ref_ranks.values())) >= 4                      # trained spectra: ranks differ
        for name in convs:
            g = h.ops.to_numpy(grads[name])
            assert g.shape == h.layer(name).weight_shape
            assert rel(g, ref[name]) < GRAD_RTOL, (partial_k, name, rel(g, ref[name]))
        assert alg.rank_loss == pytest.approx(ref_loss, rel=1e-4)
    # the sign: a small gradient-descent step on L_rank raises every layer's residual energy
    # (pushes the weights away from their best rank-k approximation)
    for name in convs:
        m = weights[name].astype(np.float64).reshape(weights[name].shape[0], -1)
        stepped = m - 1e-3 * np.linalg.norm(m) * ref[name].reshape(m.shape) / np.linalg.norm(ref[name])

        def resid(x, k=ref_ranks[name]):
            s = np.linalg.svd(x / np.linalg.norm(x), compute_uv=False)
            return np.sum(s[k:] ** 2)
        assert resid(stepped) > resid(m), name


def test_all_zero_conv_layer_is_skipped(backend, trained_state):
    h = trained_handle(backend, trained_state)
    dead = "layer2.1.conv1"
    h.set_weight(dead, h.weight(dead) * 0.0)
    alg = RPGPruner(partial_k=0.1, spectrum="gram").bind(h, total_steps=10)
    grads = alg.rank_gradients()
    assert dead not in grads and alg.ranks[dead] == 0
    # the others are unaffected; the dead layer counts as ℓ = 0 in the mean over the 19 convs
    ref, ref_ranks, ref_loss = ref_rank_gradients(conv_weights(h), 0.1)
    assert alg.ranks == ref_ranks
    for name, g in ref.items():
        assert rel(h.ops.to_numpy(grads[name]), g) < GRAD_RTOL, name
    assert np.isfinite(alg.rank_loss) and alg.rank_loss == pytest.approx(ref_loss, rel=1e-4)


def test_rank_ties_go_to_the_larger_k(backend):
    """A conv whose 64 singular values are equal: residual energy (64 − k)/64; partial_k = 3/128
    lies halfway between k = 62 (2/64) and k = 63 (1/64), a tie that float32 noise must not break."""
    h = backend.model_handle("mnist_cnn", in_channels=1, image_size=28)
    name = "conv2"                                            # (64, 32·5·5) matrix view
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((800, 64)))
    h.set_weight(name, h.ops.asarray((0.05 * q.T).reshape(64, 32, 5, 5).astype(np.float32)))
    for spectrum in ("exact", "gram", "subspace"):
        for partial_k, want in ((3 / 128, 63), (0.025, 62)):   # the tie; and one nearer 2/64
            alg = RPGPruner(partial_k=partial_k, spectrum=spectrum).bind(h, total_steps=10)
            alg.rank_gradients()
            assert alg.ranks[name] == want, (spectrum, partial_k)


def test_subspace_spectrum_right_after_a_mask_update(backend, trained_state):
    """With the warm-started subspace method, the rank term of the step right after a mask update
    (weights jump to 90 % sparsity) is still the exact one: the engine re-solves after updates."""
    h = trained_handle(backend, trained_state)
    alg = RPGPruner(sparsity=TARGET, frequency=2, spectrum="subspace", drop_alpha=0.0).bind(h, total_steps=4)
    alg.rank_gradients()                                        # dense weights: first (exact) call,
    alg.rank_gradients()                                        # and the basis sized for the ranks
    alg.rank_gradients()                                        # a warm-started call
    assert alg.engine.exact_solves == 2 * 6                     # 6 distinct conv shapes
    alg.before_step(2)                                          # the last update: 90 % sparsity
    assert alg.current_sparsity == TARGET
    weights = conv_weights(h)
    assert sum(int(np.count_nonzero(w == 0)) for w in weights.values()) > 0.85 * sum(w.size for w in weights.values())
    ref, ref_ranks, _ = ref_rank_gradients(weights, 0.1)
    grads = alg.rank_gradients()
    assert alg.ranks == ref_ranks
    for name, g in ref.items():
        assert rel(h.ops.to_numpy(grads[name]), g) < GRAD_RTOL, name


def _session_grads(state, batch, **config):
    """Gradients on the weights after PruningSession.after_backward at step 0 (torch)."""
    import torch.nn.functional as F
    from prunekit.backends.torch import PruningSession, model_handle
    h = model_handle("resnet20")
    h.load_state_numpy(state)
    opt = torch.optim.SGD(h.model.parameters(), lr=0.1)
    session = PruningSession(h, RPGPruner(**config), opt, total_steps=STEPS)
    session.before_step()
    x, y = (torch.from_numpy(a) for a in batch)
    loss = F.cross_entropy(h.model(x), y)
    opt.zero_grad()
    loss.backward()
    session.after_backward()
    return h, {l.name: h.module(l.name).weight.grad.numpy().copy() for l in h.layers}


def test_paper_semantics_adds_lambda_times_rank_gradient(trained_state, cifar):
    lam = 0.5
    h, with_term = _session_grads(trained_state, cifar[0], lam=lam, spectrum="gram")
    _, without = _session_grads(trained_state, cifar[0], lam=0.0, spectrum="gram")
    ref, _, _ = ref_rank_gradients(conv_weights(h), 0.1)
    for name in with_term:
        diff = with_term[name].astype(np.float64) - without[name]
        if name == "fc":
            np.testing.assert_array_equal(diff, 0)
        else:
            # float32: g_task + λ·g_rank − g_task carries rounding of order eps32·|g_task|
            err = np.linalg.norm(diff - lam * ref[name])
            assert err <= 1e-3 * lam * np.linalg.norm(ref[name]) + 1e-6 * np.linalg.norm(without[name]), name
    # release semantics: no term on the ordinary steps
    _, release = _session_grads(trained_state, cifar[0], lam=lam, spectrum="gram", semantics="release")
    for name in release:
        np.testing.assert_array_equal(release[name], without[name])


@pytest.mark.parametrize("algorithm", ["rpg", "trp"])
def test_torch_in_place_terms_equal_the_generic_transform(trained_state, cifar, algorithm):
    """The torch session adds an additive algorithm's terms onto .grad in place, all layers in
    one multi-tensor op (Algorithm.gradient_terms); a transform_gradients replaced on the
    instance forces the generic per-layer path. Same weights, bit for bit, over steps with a
    mask update (RPG) and with the projection (TRP)."""
    from prunekit.backends.torch import Trainer, model_handle

    def train(generic):
        h = model_handle("resnet20")
        h.load_state_numpy(trained_state)
        config = ({"sparsity": 0.5, "frequency": 2, "end_fraction": 0.8} if algorithm == "rpg" else
                  {"every": 2})
        alg = make_algorithm(algorithm, spectrum="gram", **config)
        if generic:
            alg.transform_gradients = alg.transform_gradients  # an instance attribute: the generic path
        taken = []
        orig = alg.gradient_terms

        def gradient_terms(step):
            out = orig(step)
            taken.append(out is not None and len(out) > 0)
            return out
        alg.gradient_terms = gradient_terms
        t = Trainer(h, alg, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, total_steps=5,
                    lr_schedule="constant")
        for i in range(5):
            t.train_step(*cifar[i % len(cifar)])
        return h.state_numpy(), taken
    fast, taken = train(False)
    slow, untouched = train(True)
    assert any(taken) and not untouched  # the fast path ran where terms exist; the generic one never asked
    for k in fast:
        np.testing.assert_array_equal(fast[k], slow[k], err_msg=k)


# ---------------------------------------------------------------- training: schedule and RigL
class Spy:
    """Wraps an RPGPruner's update_masks / observe_gradients to record what happens there."""

    def __init__(self, alg):
        self.alg, self.updates, self.scores, self.task = alg, [], {}, {}
        orig_update, orig_observe = alg.update_masks, alg.observe_gradients

        def update_masks(step):
            ops = alg.ops
            before = alg.handle.weights_numpy()
            old = {n: ops.to_numpy(m) > 0.5 for n, m in alg.masks.items()}
            scores = self.scores.pop(step - 1, None)
            orig_update(step)
            after = alg.handle.weights_numpy()
            new = {n: ops.to_numpy(m) > 0.5 for n, m in alg.masks.items()}
            self.updates.append((step, before, old, new, after, scores))

        def observe_gradients(step, grads):
            self.task[step] = {n: alg.ops.to_numpy(g).astype(np.float64) for n, g in grads.items()}
            orig_observe(step, grads)
            # the regrowth score the algorithm keeps: |task gradient + λ·rank gradient|
            self.scores[step] = {n: alg.ops.to_numpy(g).astype(np.float64) for n, g in alg._dense_scores.items()}

        alg.update_masks, alg.observe_gradients = update_masks, observe_gradients


def run(backend, state, batches, steps=STEPS, record=False, **config):
    h = trained_handle(backend, state)
    alg = make_algorithm("rpg", sparsity=TARGET, frequency=FREQ, spectrum="gram", **config)
    trainer = backend.Trainer(h, alg, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4,
                              total_steps=steps, lr_schedule="constant")
    spy = Spy(alg)
    per_step = []
    for t in range(steps):
        before = h.state_numpy() if record else None
        trainer.train_step(*batches[t % len(batches)])
        if record:
            per_step.append((before, h.state_numpy()))
    trainer.finish()
    return h, alg, spy, per_step


def test_schedule_rigl_and_final_sparsity(backend, trained_state, cifar):
    # the rank term (paper semantics) on every update step only: it costs an eigh per layer shape
    h, alg, spy, _ = run(backend, trained_state, cifar, drop_alpha=0.3, rank_every=FREQ)
    names = [l.name for l in h.layers]
    total = sum(l.numel for l in h.layers)
    assert alg.t_end == T_END
    assert [u[0] for u in spy.updates] == UPDATES                      # dense start, every FREQ steps
    regrown_total = 0
    for step, before, old, new, after, scores in spy.updates:
        # exponential density schedule D^(u/U), D = 1 − target; exactly the target at T_end
        density = (1 - TARGET) ** ((step // FREQ) / N_UPDATES) if step < T_END else 1 - TARGET
        assert sum(int(new[n].sum()) for n in names) == keep(total, 1 - density), step
        # the magnitude part: one global threshold over every weighted layer (stem and fc included)
        flat = np.concatenate([np.abs(before[n]).reshape(-1) for n in names])
        mag = ref_topk(flat, keep(total, 1 - density))
        sizes = np.cumsum([0] + [before[n].size for n in names])
        mag = {n: mag[sizes[i]:sizes[i + 1]].reshape(before[n].shape) for i, n in enumerate(names)}
        frac = 0.3 / 2 * (1 + math.cos(math.pi * step / T_END))
        for n in names:
            active = int(mag[n].sum())
            assert int(new[n].sum()) == active, (step, n)             # drop/grow keeps the count
            n_drop = min(int(frac * active), mag[n].size - active)
            dropped = mag[n] & ~new[n]
            grown = new[n] & ~mag[n]
            assert int(dropped.sum()) == n_drop == int(grown.sum()), (step, n)
            if n_drop:
                # drop: the smallest |w| among the magnitude survivors; grow: the largest |dense
                # gradient| among the others (not the ones just dropped)
                w_active = np.where(mag[n], np.abs(before[n]), -1.0)
                np.testing.assert_array_equal(new[n] & mag[n], ref_topk(w_active, active - n_drop),
                                              err_msg=f"{step} {n}")
                g_inactive = np.where(mag[n], -1.0, np.abs(scores[n]))
                np.testing.assert_array_equal(grown, ref_topk(g_inactive, n_drop), err_msg=f"{step} {n}")
            # regrown weights are zero right after the update; survivors are untouched
            assert np.all(after[n][grown] == 0), (step, n)
            np.testing.assert_array_equal(after[n][new[n] & mag[n]], before[n][new[n] & mag[n]])
            assert np.all(after[n][~new[n]] == 0)
            regrown_total += int(grown.sum())
        if step == T_END:
            assert frac == pytest.approx(0.0, abs=1e-12)
    assert regrown_total > 0
    # masks move between updates by more than magnitude: weights pruned earlier come back
    revived = sum(int((spy.updates[i + 1][3][n] & ~spy.updates[i][3][n]).sum())
                  for i in range(len(spy.updates) - 1) for n in names)
    assert revived > 0
    # the measured sparsity at the end is exactly the target (global count)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in h.weights_numpy().values())
    assert zeros == total - keep(total, TARGET)
    assert alg.current_sparsity == TARGET
    plan = alg.plan()
    assert set(plan.ranks) == {n for n in names if n != "fc"} and all(k >= 1 for k in plan.ranks.values())
    assert sum(int(m.sum()) for m in plan.masks.values()) == keep(total, TARGET)


def test_without_drop_grow_masks_only_shrink(backend, trained_state, cifar):
    h, alg, spy, _ = run(backend, trained_state, cifar, drop_alpha=0.0, lam=0.0)
    names = [l.name for l in h.layers]
    assert not spy.scores                                         # no dense gradients asked for
    assert len(spy.updates) >= 3
    for (_, _, _, a, _, _), (_, _, _, b, _, _) in zip(spy.updates, spy.updates[1:]):
        for n in names:
            assert not np.any(b[n] & ~a[n]), n                    # nothing pruned comes back


def test_release_semantics_skips_the_step_before_each_update(backend, trained_state, cifar):
    h, alg, spy, per_step = run(backend, trained_state, cifar, record=True, semantics="release", lam=0.5,
                                drop_alpha=0.3)
    trainable = [k for k in per_step[0][0] if not k.endswith(("running_mean", "running_var"))]
    opened = {u[0]: u[4] for u in spy.updates}   # weights right after the mask update opening a step
    frozen = []
    for t, (before, after) in enumerate(per_step):
        start = dict(before)
        start.update({f"{n}.weight": w for n, w in opened.get(t, {}).items()})
        if all(np.array_equal(start[k], after[k]) for k in trainable):
            frozen.append(t)
    assert frozen == [u - 1 for u in UPDATES]                     # exactly the steps before updates
    assert [alg.should_step_optimizer(t) for t in range(STEPS)] == [t + 1 not in UPDATES for t in range(STEPS)]
    plan = alg.plan()
    conv = {l.name for l in h.layers if l.kind == "conv"}
    assert set(plan.ranks) == conv and all(k >= 1 for k in plan.ranks.values())
    assert plan.meta["semantics"] == "release"
    # the regrowth score there is |task gradient + λ·rank gradient| (weights unchanged since, as
    # the optimizer step was skipped); it picks other weights than the task gradient alone
    mismatch, differs, n_grown = 0, 0, 0
    for step, before, old, new, after, scores in spy.updates:
        if step == T_END:
            continue
        ref, _, _ = ref_rank_gradients({n: w for n, w in before.items() if w.ndim == 4}, 0.1)
        names = [l.name for l in h.layers]
        total_w = sum(before[n].size for n in names)
        density = (1 - TARGET) ** ((step // FREQ) / N_UPDATES)
        flat = ref_topk(np.concatenate([np.abs(before[n]).reshape(-1) for n in names]), keep(total_w, 1 - density))
        sizes = np.cumsum([0] + [before[n].size for n in names])
        for i, n in enumerate(names):
            mag = flat[sizes[i]:sizes[i + 1]].reshape(before[n].shape)
            grown = new[n] & ~mag
            k = int(grown.sum())
            if not k:
                continue
            task = spy.task[step - 1][n]
            score = np.abs(task + (0.5 * ref[n] if n in ref else 0.0))
            want = ref_topk(np.where(mag, -1.0, score), k)
            task_only = ref_topk(np.where(mag, -1.0, np.abs(task)), k)
            mismatch += int((grown & ~want).sum())
            differs += int((want & ~task_only).sum())
            n_grown += k
    assert n_grown > 0
    assert mismatch <= 0.01 * n_grown, (mismatch, n_grown)       # float32 vs float64 near-ties only
    assert differs > mismatch
    total = sum(l.numel for l in h.layers)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in h.weights_numpy().values())
    assert zeros == total - keep(total, TARGET)


# ---------------------------------------------------------------- a user's own loop
def test_plain_session_loop_with_release_semantics(trained_state, cifar):
    import torch.nn.functional as F
    from prunekit.backends.torch import PruningSession, model_handle
    h = model_handle("resnet20")
    h.load_state_numpy(trained_state)
    opt = torch.optim.SGD(h.model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    alg = RPGPruner(sparsity=TARGET, frequency=FREQ, semantics="release", lam=0.5, spectrum="subspace",
                    refresh_every=5)
    session = PruningSession(h, alg, opt, total_steps=STEPS)
    skipped = []
    for t in range(STEPS):
        x, y = (torch.from_numpy(a) for a in cifar[t % len(cifar)])
        session.before_step()
        if t in UPDATES:   # momentum of the weights just pruned is zero (optimizer state masked)
            for l in h.layers:
                p = h.module(l.name).weight
                buf = opt.state[p]["momentum_buffer"]
                pruned = h.ops.to_numpy(alg.masks[l.name]) < 0.5
                assert np.all(buf.numpy()[pruned] == 0), (t, l.name)
        loss = F.cross_entropy(h.model(x), y)
        opt.zero_grad()
        loss.backward()
        session.after_backward()
        before = [p.detach().clone() for p in h.model.parameters()]
        if session.should_step():
            opt.step()
        else:
            skipped.append(t)
        session.after_optimizer_step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, h.model.parameters()))
        assert unchanged == (t in skipped), t
    session.finish()
    assert skipped == [u - 1 for u in UPDATES]
    assert session.step == STEPS
    total = sum(l.numel for l in h.layers)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in h.weights_numpy().values())
    assert zeros == total - keep(total, TARGET)
    assert set(session.state_dict()["algorithm"]["ranks"]) == {l.name for l in h.layers if l.kind == "conv"}


def test_paper_term_is_masked_after_an_update(trained_state, cifar):
    """In a plain loop, at a step after the first mask update: the rank term is λ·∂L_rank/∂W on
    the kept weights only, computed from the current (sparse) weights."""
    import torch.nn.functional as F
    from prunekit.backends.torch import PruningSession, model_handle
    lam = 0.5
    h = model_handle("resnet20")
    h.load_state_numpy(trained_state)
    opt = torch.optim.SGD(h.model.parameters(), lr=0.02, momentum=0.9)
    alg = RPGPruner(sparsity=TARGET, frequency=FREQ, lam=lam, spectrum="exact", drop_alpha=0.0)
    session = PruningSession(h, alg, opt, total_steps=STEPS)
    for t in range(FREQ + 1):
        x, y = (torch.from_numpy(a) for a in cifar[t % len(cifar)])
        session.before_step()
        loss = F.cross_entropy(h.model(x), y)
        opt.zero_grad()
        loss.backward()
        raw = {l.name: h.module(l.name).weight.grad.numpy().astype(np.float64) for l in h.layers}
        convs = conv_weights(h)
        session.after_backward()
        if t == FREQ:
            ref, _, _ = ref_rank_gradients(convs, 0.1)
            for l in h.layers:
                mask = h.ops.to_numpy(alg.masks[l.name])
                got = h.module(l.name).weight.grad.numpy().astype(np.float64)
                assert np.all(got[mask == 0] == 0), l.name
                want = raw[l.name] * mask + (lam * ref[l.name] * mask if l.name in ref else 0)
                assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want - raw[l.name] * mask) + 1e-7, l.name
        if session.should_step():
            opt.step()
        session.after_optimizer_step()
    assert 0 < alg.current_sparsity < TARGET


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("bad", [dict(partial_k=0), dict(partial_k=1), dict(partial_k=1.5), dict(semantics="foo"),
                                 dict(spectrum="bar"), dict(lam=-1), dict(lam=float("nan")), dict(sparsity=1.0),
                                 dict(drop_alpha=1.0), dict(end_fraction=0), dict(rank_every=0), dict(frequency=0)])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        make_algorithm("rpg", **bad)
    with pytest.raises(ConfigError):
        RPGConfig(**bad)


def test_error_messages_name_the_value():
    with pytest.raises(ConfigError, match="foo"):
        make_algorithm("rpg", semantics="foo")
    with pytest.raises(ConfigError, match="bar"):
        make_algorithm("rpg", spectrum="bar")
    defaults = RPGConfig()
    assert (defaults.partial_k, defaults.lam, defaults.semantics, defaults.rank_every, defaults.drop_alpha) == \
        (0.1, 0.5, "paper", 1, 0.3)


def test_regrown_weights_start_with_zero_optimizer_state(backend, trained_state, cifar):
    """A weight regrown by RigL starts from zero: its value and its momentum."""
    h = trained_handle(backend, trained_state)
    alg = make_algorithm("rpg", sparsity=TARGET, frequency=FREQ, spectrum="gram", drop_alpha=0.3)
    trainer = backend.Trainer(h, alg, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4,
                              total_steps=STEPS, lr_schedule="constant")
    session = trainer.session
    seen = {}
    orig = alg.update_masks

    def update_masks(step):
        before = h.weights_numpy()
        orig(step)
        seen[step] = before

    alg.update_masks = update_masks
    checked = 0
    for step, (x, y) in zip(range(2 * FREQ + 1), cifar * 10):
        session.before_step()  # an update step: masks change and the optimizer state is synced
        if step in seen:
            new = {n: alg.ops.to_numpy(m) > 0.5 for n, m in alg.masks.items()}
            after = h.weights_numpy()
            for name in new:
                # regrown: kept by the new mask, but set to zero from a non-zero value
                regrown = new[name] & (after[name] == 0) & (seen[step][name] != 0)
                for buf in optimizer_buffers(backend, trainer, h, name):
                    assert np.all(buf[regrown] == 0), (step, name)
                    checked += int(regrown.sum())
        loss_step(backend, trainer, x, y)
    assert checked > 0


def optimizer_buffers(backend, trainer, handle, name):
    """The optimizer's per-weight state arrays (momentum) of one layer, as NumPy."""
    if backend.name == "torch":
        p = handle.module(name).weight
        return [v.detach().numpy() for v in trainer.optimizer.state.get(p, {}).values()
                if hasattr(v, "shape") and tuple(v.shape) == tuple(p.shape)]
    return [s.asnumpy() for s in trainer.session._state.get(name, ())]


def loss_step(backend, trainer, x, y):
    """The rest of one Trainer step after ``session.before_step()`` (which the test made)."""
    session = trainer.session
    session.before_step = lambda: None  # already done for this step
    try:
        trainer.train_step(x, y)
    finally:
        del session.before_step
