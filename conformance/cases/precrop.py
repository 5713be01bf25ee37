"""Cases ``decisions/precrop_from_scores/*`` and ``decisions/precrop_autograd/*``: PreCropping's
global threshold and channel plan from identical scores (bitwise), and from each framework's own
SNIP / SynFlow scores at initialization (within the tolerances below). GraSP is not here: it
needs a Hessian-vector product, which MindSpore on CPU does not give reliably."""
from __future__ import annotations

from typing import List

import numpy as np

from prunekit.decisions.selection import keep_count

from ..fixtures import rng
from .base import Case, Outputs, Tol


PRECROP_SPARSITY = 0.9


def _precrop_outputs(groups, layers, densities, masks, plan, scores=None) -> Outputs:
    out = {"density": np.array([densities[l.name] for l in layers]), "ratio_offset": np.array([plan.offset]),
           "kept_weights": np.array([plan.kept_weights])}
    for g in groups:
        if g.prunable:
            kept = np.zeros(g.size, bool)
            kept[plan.keep.get(g.name, np.arange(g.size))] = True
            out[f"channels_kept/{g.name}"] = np.array([plan.counts[g.name]])
            out[f"channel_mask/{g.name}"] = kept
            out[f"log_ratio/{g.name}"] = np.array([plan.log_ratios[g.name]])
    for name, m in masks.items():
        out[f"mask/{name}"] = m
    for name, s in (scores or {}).items():
        out[f"score/{name}"] = s.reshape(-1)
    return out


def _precrop_from_scores(backend, model: str) -> Outputs:
    """Identical NumPy scores (with ties) into each backend's global threshold, then the channel
    plan: every decision must be bitwise identical (and equal to the NumPy tie rule)."""
    from prunekit.algorithms.precrop import plan_channels, scored_layers
    from prunekit.decisions.channel_groups import find_channel_groups
    from prunekit.decisions.pai_scores import layer_densities
    from prunekit.decisions.selection import global_topk_masks

    handle = backend.model_handle(model, 10, 3, 32, seed=0)
    ops = handle.ops
    layers = scored_layers(handle.layers)
    r = rng(47)
    scores = {l.name: np.round(r.random(l.weight_shape), 2).astype(np.float32) for l in layers}
    keep = keep_count(sum(l.numel for l in layers), PRECROP_SPARSITY)
    masks = global_topk_masks(ops, {n: ops.asarray(v) for n, v in scores.items()}, keep)
    densities = layer_densities(ops, masks)
    groups = find_channel_groups(handle)
    plan = plan_channels(groups, layers, densities, keep, scores)
    return _precrop_outputs(groups, layers, densities, {n: ops.to_numpy(m) > 0.5 for n, m in masks.items()}, plan)


def _precrop_autograd(backend, model: str, score: str) -> Outputs:
    """Scores from each framework's autograd (identical weights and batch), then the decisions."""
    from prunekit.algorithms.precrop import PreCropPruner
    from prunekit.decisions.channel_groups import find_channel_groups

    handle = backend.model_handle(model, 10, 3, 32, seed=0)
    r = rng(53)
    batch = (r.standard_normal((16, 3, 32, 32)).astype(np.float32), r.integers(0, 10, 16))
    algo = PreCropPruner(score=score, sparsity=PRECROP_SPARSITY, rounds=3 if score == "synflow" else 1)
    densities = algo.score(handle, [batch])
    groups = find_channel_groups(handle)
    plan = algo.plan_channels(groups)
    masks = {n: handle.ops.to_numpy(m) > 0.5 for n, m in algo._init_masks.items()}
    peak = max(float(np.abs(s).max()) for s in algo.scores.values())
    scores = {n: s / peak for n, s in algo.scores.items()}  # relative to the largest score
    return _precrop_outputs(groups, algo.layers, densities, masks, plan, scores)


def cases() -> List[Case]:
    cases = []
    for model in ("resnet20", "mobilenetv2"):
        cases.append(Case(f"decisions/precrop_from_scores/{model}", "decisions",
                          lambda b, m=model: _precrop_from_scores(b, m)))
    for score in ("snip", "synflow"):
        # Scores from two frameworks' float32 autograd, relative to the largest score: measured
        # within 2.4e-7 for SynFlow and 1.8e-4 for SNIP (train-mode BN on a batch of 16 amplifies the
        # convolutions' rounding; PyTorch alone moves by that much when oneDNN is capped at AVX2, as
        # the MindSpore backend's import does). Weights whose scores sit that close to the global
        # threshold fall either side: SNIP masks measured >= 99.95 % equal per layer, densities within
        # 5e-4, log-ratios within 2e-3, channel counts and kept channels identical. Tolerances:
        cases.append(Case(f"decisions/precrop_autograd/{score}/resnet20", "decisions",
                          lambda b, s=score: _precrop_autograd(b, "resnet20", s), None,
                          {"score": Tol("close", atol=1e-3), "density": Tol("close", atol=2e-3),
                           "mask": Tol("agree", min_agreement=0.999),
                           "channels_kept": Tol("close", atol=1), "log_ratio": Tol("close", atol=0.05),
                           "ratio_offset": Tol("close", atol=0.05),
                           "kept_weights": Tol("close", rtol=0.01),
                           "channel_mask": Tol("agree", min_agreement=0.97)}))
    return cases
