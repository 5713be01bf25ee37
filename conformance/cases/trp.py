"""Cases ``decisions/trp_step/*`` and ``decisions/trp_decomposition/*``: one TRP step (energy
rank, projection, nuclear-norm gradient; channel, spatial and nd schemes, device and host)
against a float64 NumPy reference, and the final decomposition of identical model weights into
two convs (nd: the pointwise and grouped convs of the parallel paths; ranks, factor shapes and
logits, and for nd the logits of the per-filter truncated model, which the paths must equal)."""
from __future__ import annotations

from typing import List

import numpy as np

from ..fixtures import DEPTHWISE_GROUPS, RANK_SCENARIOS, ArrayHandle, float32_weights, rng
from .base import Case, Outputs, Tol


def _trp_step(backend, scenario: str, scheme: str, rank_on: str = "device", spectrum: str = "auto") -> Outputs:
    from prunekit.algorithms.trp import TRPConfig, TRPPruner

    ops = backend.Ops()
    weights = float32_weights(scenario)
    h = ArrayHandle(ops, weights, DEPTHWISE_GROUPS)
    algo = TRPPruner(TRPConfig(energy=0.9, lam=1e-2, scheme=scheme, rank_on=rank_on, spectrum=spectrum))
    # ArrayHandle layers have no stem: keep every k×k, non-grouped conv
    algo.select_layers = lambda layers: [l for l in layers if l.kind == "conv" and min(l.kernel_size) > 1 and l.groups == 1]
    algo.bind(h, 10)
    zero = {l.name: ops.zeros(l.weight_shape) for l in algo.layers}
    algo.before_step(0)
    grads = algo.transform_gradients(0, dict(zero))
    out = {}
    for l in algo.layers:
        out[f"rank/{l.name}"] = np.array(algo.ranks[l.name])
        out[f"projected/{l.name}"] = ops.to_numpy(h.weight(l.name))
        out[f"nuclear_grad/{l.name}"] = ops.to_numpy(grads[l.name])
    return out


def _ref_trp_step(scenario: str, scheme: str) -> Outputs:
    from prunekit.decisions.selection import energy_rank

    out = {}
    for n, w in float32_weights(scenario).items():
        if w.ndim != 4 or min(w.shape[2:]) < 2:
            continue
        co, ci, kh, kw = w.shape
        w64 = w.astype(np.float64)
        if scheme == "nd":
            out.update(_ref_nd_layer(n, w64))
            continue
        m = w64.reshape(co, -1) if scheme == "channel" else w64.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        r = energy_rank(s, 0.9)
        trunc = (u[:, :r] * s[:r]) @ vh[:r]
        uv = u[:, :r] @ vh[:r] * 1e-2
        back = (lambda x: x.reshape(w.shape)) if scheme == "channel" else (
            lambda x: x.reshape(ci, kh, co, kw).transpose(2, 0, 1, 3))
        out[f"rank/{n}"] = np.array(r)
        out[f"projected/{n}"] = back(trunc) if r else w64
        if r:
            out[f"nuclear_grad/{n}"] = back(uv)
        else:
            out[f"nuclear_grad/{n}"] = np.zeros(w.shape)
    return out


def _ref_nd_layer(name: str, w64: np.ndarray) -> Outputs:
    """The nd step on one layer: every filter (C_in, kh·kw) truncated to its own energy rank."""
    from prunekit.decisions.selection import energy_rank

    co, ci, kh, kw = w64.shape
    u, s, vh = np.linalg.svd(w64.reshape(co, ci, kh * kw), full_matrices=False)
    ranks = [energy_rank(x, 0.9) for x in s]
    trunc = np.stack([(u[o, :, :r] * s[o, :r]) @ vh[o, :r] for o, r in enumerate(ranks)]).reshape(w64.shape)
    uv = np.stack([u[o, :, :r] @ vh[o, :r] for o, r in enumerate(ranks)]).reshape(w64.shape) * 1e-2
    return {f"rank/{name}": np.array(min(max(ranks), ci, kh * kw)), f"projected/{name}": trunc,
            f"nuclear_grad/{name}": uv}


def _trp_decomposition(backend, model: str, scheme: str) -> Outputs:
    """Decompose identical weights on each backend; compare ranks, factors and outputs."""
    from prunekit.algorithms.trp import plan_decompositions

    handle = backend.model_handle(model, seed=21)
    x = rng(22).standard_normal((4, 3, 32, 32)).astype(np.float32)
    decompositions = plan_decompositions(handle, scheme, threshold=None, energy=0.8)
    new = backend.apply_decompositions(handle, decompositions)
    out = {f"rank/{d.layer}": np.array(d.rank) for d in decompositions}
    out["logits"] = new.predict(x)
    out["layer_shapes"] = np.array([s for l in new.layers for s in l.weight_shape])
    if scheme == "nd":  # the paths compute the model whose filters are truncated to K terms
        from prunekit.decisions.spectrum import nd_truncate

        ref = backend.model_handle(model, seed=21)
        state = ref.state_numpy()
        for d in decompositions:
            state[f"{d.layer}.weight"] = nd_truncate(state[f"{d.layer}.weight"], d.rank).astype(np.float32)
        ref.load_state_numpy(state)
        out["truncated_logits"] = ref.predict(x)
        err = float(np.abs(out["truncated_logits"] - out["logits"]).max())
        if not err <= 1e-4:  # a backend whose paths differ from the truncated conv fails the case
            raise RuntimeError(f"nd decomposition differs from the truncated model by {err:.3g} (> 1e-4)")
    return out


def cases() -> List[Case]:
    out = []
    variants = (("channel", "device", "auto"), ("spatial", "device", "auto"), ("channel", "host", "auto"),
                ("channel", "device", "tracked"), ("spatial", "device", "tracked"), ("nd", "device", "auto"),
                ("nd", "host", "auto"))
    for scenario in RANK_SCENARIOS:
        for scheme, rank_on, spectrum in variants if scenario != "pointwise_and_depthwise" else ():  # TRP skips 1x1/depthwise
            label = f"{scheme}-{rank_on}" + ("-tracked" if spectrum == "tracked" else "")
            out.append(Case(f"decisions/trp_step/{label}/{scenario}", "decisions",
                            lambda b, s=scenario, c=scheme, o=rank_on, m=spectrum: _trp_step(b, s, c, o, m),
                            lambda s=scenario, c=scheme: _ref_trp_step(s, c),
                            {"projected": Tol("close", atol=1e-4, rtol=1e-4),
                             "nuclear_grad": Tol("close", atol=1e-5, rtol=1e-3)}))
    for model in ("resnet20", "vgg16"):
        for scheme in ("channel", "spatial"):
            out.append(Case(f"decisions/trp_decomposition/{scheme}/{model}", "decisions",
                            lambda b, m=model, c=scheme: _trp_decomposition(b, m, c), None,
                            {"logits": Tol("close", atol=1e-4, rtol=1e-4)}))
    # nd (network decoupling): same ranks and factor shapes (exact), same logits, and on each
    # backend the decomposed model's logits within 1e-4 of the per-filter truncated model's
    out.append(Case("decisions/trp_decomposition/nd/resnet20", "decisions",
                    lambda b: _trp_decomposition(b, "resnet20", "nd"), None,
                    {"logits": Tol("close", atol=1e-4, rtol=1e-4), "truncated_logits": Tol("close", atol=1e-4, rtol=1e-4)}))
    return out
