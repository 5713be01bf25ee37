"""Cases ``decisions/channel_groups/resnet20b``, ``decisions/channel_compaction/resnet20b`` and
``decisions/dsa_allocation/resnet20b``: the projection-shortcut ResNet (1x1 conv + BN shortcuts
where the shape changes) on both backends. Its residual streams are prunable groups, so the
probe's groups, the compacted model (streams narrowed, projection convs included) and DSA's
allocation over the streams must agree across backends."""
from __future__ import annotations

from typing import List

import numpy as np

from ..fixtures import rng
from .base import Case, Outputs, Tol
from .channel import _channel_compaction, _channel_groups

MODEL = "resnet20b"


def _dsa_allocation(backend) -> Outputs:
    """DSA bound to resnet20b with identical random BatchNorm scales: its groups (streams
    included), the keep probabilities and the budget projection's final channels and MACs."""
    from prunekit.algorithms.dsa import DSAConfig, DSAPruner

    handle = backend.model_handle(MODEL, seed=33)
    r = rng(63)
    state = handle.state_numpy()
    gammas = {k: (r.uniform(0.05, 1.5, v.shape) * r.choice([-1.0, 1.0], v.shape)).astype(np.float32)
              for k, v in state.items() if k.endswith(".weight") and v.ndim == 1}
    handle.load_state_numpy(gammas, strict=False)
    algo = DSAPruner(DSAConfig(budget=0.5, arch_lr=0.1, seed=7)).bind(handle, 10)
    try:
        index = {l.name: i for i, l in enumerate(handle.layers)}
        probs = algo.probabilities(algo.importance())
        out = {"groups": np.array([index.get(g.name, -1) for g in algo.groups], np.int64),
               "p": np.concatenate([probs[n][0] for n in probs])}
        algo.finish()
        out["final_counts"] = np.asarray(algo.final_counts, np.int64)
        out["final_macs"] = np.array([algo.final_flops])
    finally:
        algo.gates.remove()
    return out


def cases() -> List[Case]:
    # As in cases/channel.py: groups, kept channels and DSA's decisions from identical weights
    # bitwise (host float64); logits within float32 noise; keep probabilities from identical BN
    # scales read back as float32 within 1e-6.
    return [
        Case(f"decisions/channel_groups/{MODEL}", "decisions", lambda b: _channel_groups(b, MODEL, 3, 32)),
        Case(f"decisions/channel_compaction/{MODEL}", "decisions", lambda b: _channel_compaction(b, MODEL, 3, 32), None,
             {"logits": Tol("close", atol=1e-4), "logit_scale": Tol("close", rtol=1e-4)}),
        Case(f"decisions/dsa_allocation/{MODEL}", "decisions", _dsa_allocation, None,
             {"p": Tol("close", atol=1e-6)}),
    ]
