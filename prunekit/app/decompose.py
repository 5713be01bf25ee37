"""Final low-rank decomposition of a model trained with TRP (neutral part).

:func:`plan_decompositions` computes, from a model handle, the two-conv factors of every
layer TRP works on; the backend's ``surgery.apply_decompositions`` builds them. Parameters and
FLOPs before and after come from the model's layers (:mod:`prunekit.decisions.flops`).
"""
from __future__ import annotations

from typing import List, Optional

from prunekit.algorithms.trp import Decomposition, TRPPruner, decomposition_factors


def plan_decompositions(handle, scheme: str = "channel", threshold: Optional[float] = 0.05,
                        rank: Optional[int] = None, energy: Optional[float] = None,
                        layers: Optional[List[str]] = None) -> List[Decomposition]:
    state = handle.state_numpy()
    names = layers if layers is not None else [l.name for l in TRPPruner().select_layers(handle.layers)]
    out = []
    for name in names:
        info = handle.layer(name)
        out.append(decomposition_factors(state[f"{name}.weight"], state.get(f"{name}.bias"), info.stride, info.padding,
                                         scheme, threshold, rank, energy, layer=name))
    return out
