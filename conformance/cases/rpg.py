"""Cases ``decisions/rpg_rank_term/*`` and ``decisions/rpg_mask_update/*``: RPG's ranks and
rank-term gradient (every spectrum engine, on the device and on the host) against a float64
NumPy reference, and one mask update (magnitude, then RigL drop/grow) from identical weights and
gradients."""
from __future__ import annotations

from typing import List

import numpy as np

from ..fixtures import DEPTHWISE_GROUPS, RANK_SCENARIOS, ArrayHandle, float32_weights, rng
from .base import Case, Outputs, Tol


def _rpg_rank_term(backend, scenario: str, spectrum: str, rank_on: str = "device") -> Outputs:
    from prunekit.algorithms.rpg import RPGConfig, RPGPruner

    ops = backend.Ops()
    h = ArrayHandle(ops, float32_weights(scenario), DEPTHWISE_GROUPS)
    algo = RPGPruner(RPGConfig(sparsity=0.9, partial_k=0.1, spectrum=spectrum, rank_on=rank_on)).bind(h, 1000)
    grads = algo.rank_gradients()
    out = {f"rank/{n}": np.array(k) for n, k in algo.ranks.items()}
    out.update({f"grad/{n}": ops.to_numpy(g) for n, g in grads.items()})
    return out


def _ref_rpg_rank_term(scenario: str) -> Outputs:
    """RPG's k and ∂(mean_l −‖Mn − Ŵ‖²)/∂W by NumPy SVD in float64 and the chain rule."""
    from prunekit.decisions.selection import residual_rank

    weights = float32_weights(scenario)
    convs = [n for n, w in weights.items() if w.ndim == 4]
    out = {}
    for n in convs:
        m = weights[n].astype(np.float64).reshape(weights[n].shape[0], -1)
        nrm = np.linalg.norm(m)
        if nrm == 0:
            out[f"rank/{n}"] = np.array(0)
            continue
        mn = m / nrm
        u, s, vh = np.linalg.svd(mn, full_matrices=False)
        k = residual_rank(s, 0.1)
        r = mn - (u[:, :k] * s[:k]) @ vh[:k]
        g = -2 * r
        grad = (g - np.sum(g * mn) * mn) / nrm / len(convs)
        out[f"rank/{n}"] = np.array(k)
        out[f"grad/{n}"] = grad.reshape(weights[n].shape)
    return out


def _rpg_update(backend, scenario: str) -> Outputs:
    """One RPG mask update (global magnitude at the scheduled density, then RigL drop/grow)
    from identical weights and identical dense gradients."""
    from prunekit.algorithms.rpg import RPGConfig, RPGPruner

    ops = backend.Ops()
    weights = float32_weights(scenario)
    r = rng(9)
    grads = {n: ops.asarray(r.standard_normal(w.shape).astype(np.float32)) for n, w in weights.items()}
    h = ArrayHandle(ops, weights, DEPTHWISE_GROUPS)
    algo = RPGPruner(RPGConfig(sparsity=0.95, frequency=10, end_fraction=0.8, drop_alpha=0.3)).bind(h, 101)
    out = {}
    for step in (10, 20):
        algo.observe_gradients(step - 1, grads)
        algo.update_masks(step)
        for n, m in algo.masks.items():
            out[f"mask/{step}/{n}"] = ops.to_numpy(m).astype(bool)
            out[f"weight_zero/{step}/{n}"] = ops.to_numpy(h.weight(n)) == 0
    return out


def cases() -> List[Case]:
    grad_tol = {"grad": Tol("close", atol=1e-5, rtol=1e-3)}
    out = []
    for scenario in RANK_SCENARIOS:
        # the rank term on the framework's device and on the host (NumPy), where MindSpore-on-CPU runs it
        # "tracked": the accelerators' path (prunekit/decisions/spectrum_tracking.py), whose solve runs on the host
        for spectrum, rank_on in (("exact", "device"), ("gram", "device"), ("gram", "host"), ("tracked", "device")):
            out.append(Case(f"decisions/rpg_rank_term/{spectrum}-{rank_on}/{scenario}", "decisions",
                            lambda b, s=scenario, m=spectrum, o=rank_on: _rpg_rank_term(b, s, m, o),
                            lambda s=scenario: _ref_rpg_rank_term(s), grad_tol))
        out.append(Case(f"decisions/rpg_mask_update/{scenario}", "decisions",
                        lambda b, s=scenario: _rpg_update(b, s)))
    return out
