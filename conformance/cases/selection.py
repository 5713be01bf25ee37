"""Cases ``decisions/magnitude_masks/*`` and ``decisions/energy_rank/*``: the selection rules on
chosen weights (ties, zeros, rank-deficient layers): magnitude masks, unstructured and per
channel, global and per layer, against the documented tie rule written independently in NumPy;
energy ranks from each backend's singular values."""
from __future__ import annotations

from typing import List

import numpy as np

from prunekit.algorithms.magnitude import magnitude_masks
from prunekit.decisions.selection import energy_rank, keep_count

from ..fixtures import DEPTHWISE_GROUPS, ArrayHandle, float32_weights, weight_scenarios
from .base import Case, Outputs


SPARSITIES = (0.5, 0.9, 0.99)


def _decision_masks(backend, scenario: str) -> Outputs:
    ops = backend.Ops()
    weights = float32_weights(scenario)
    out = {}
    for granularity in ("unstructured", "channel"):
        for scope in ("global", "layer"):
            for s in SPARSITIES:
                h = ArrayHandle(ops, weights, DEPTHWISE_GROUPS)
                masks = magnitude_masks(h, h.layers, s, granularity, scope)
                for name, m in masks.items():
                    out[f"mask/{granularity}/{scope}/{s}/{name}"] = ops.to_numpy(m).astype(bool)
    return out


def _tie_rule_keep(scores: np.ndarray, k: int) -> np.ndarray:
    """The documented rule, independently: order by (score desc, index asc), keep first k."""
    flat = scores.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def _ref_decision_masks(scenario: str) -> Outputs:
    weights = float32_weights(scenario)
    names = list(weights)
    out = {}
    for s in SPARSITIES:
        # unstructured
        flat = np.concatenate([np.abs(weights[n]).reshape(-1) for n in names])
        keep = _tie_rule_keep(flat, keep_count(flat.size, s))
        start = 0
        for n in names:
            size = weights[n].size
            out[f"mask/unstructured/global/{s}/{n}"] = keep[start:start + size].reshape(weights[n].shape)
            start += size
            w = np.abs(weights[n])
            out[f"mask/unstructured/layer/{s}/{n}"] = _tie_rule_keep(w, keep_count(w.size, s))
        # channel: L2 norm per output channel (RMS for the global scope), >= 1 channel per layer
        norms = {n: np.sqrt(np.sum(np.square(weights[n].reshape(weights[n].shape[0], -1)), axis=1, dtype=np.float32))
                 for n in names}
        rms = {n: (norms[n] * np.float32(1.0 / np.sqrt(max(1, weights[n][0].size)))).astype(np.float32) for n in names}
        flat = np.concatenate([rms[n] for n in names])
        keep = _tie_rule_keep(flat, keep_count(flat.size, s))
        start = 0
        for n in names:
            c = weights[n].shape[0]
            ch = keep[start:start + c]
            start += c
            if not ch.any():
                ch = _tie_rule_keep(rms[n], 1)
            shape = (c,) + (1,) * (weights[n].ndim - 1)
            out[f"mask/channel/global/{s}/{n}"] = np.broadcast_to(ch.reshape(shape), weights[n].shape)
            chl = _tie_rule_keep(norms[n], max(1, keep_count(c, s)))
            out[f"mask/channel/layer/{s}/{n}"] = np.broadcast_to(chl.reshape(shape), weights[n].shape)
    return out


ENERGIES = (0.5, 0.9, 0.99)


def _matrix_view(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def _decision_ranks(backend, scenario: str) -> Outputs:
    ops = backend.Ops()
    out = {}
    for name, w in weight_scenarios()[scenario].items():
        _, s, _ = ops.svd(ops.asarray(_matrix_view(w).astype(np.float32)))
        spectrum = ops.to_numpy(s)
        for e in ENERGIES:
            out[f"rank/{e}/{name}"] = np.array(energy_rank(spectrum, e))
    return out


def _ref_decision_ranks(scenario: str) -> Outputs:
    out = {}
    for name, w in weight_scenarios()[scenario].items():
        s = np.linalg.svd(_matrix_view(w).astype(np.float32).astype(np.float64), compute_uv=False)
        for e in ENERGIES:
            out[f"rank/{e}/{name}"] = np.array(energy_rank(s, e))
    return out


def cases() -> List[Case]:
    out = []
    for scenario in weight_scenarios():
        out.append(Case(f"decisions/magnitude_masks/{scenario}", "decisions",
                        lambda b, s=scenario: _decision_masks(b, s), lambda s=scenario: _ref_decision_masks(s)))
        out.append(Case(f"decisions/energy_rank/{scenario}", "decisions",
                        lambda b, s=scenario: _decision_ranks(b, s), lambda s=scenario: _ref_decision_ranks(s)))
    return out
