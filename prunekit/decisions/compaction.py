"""Compaction bookkeeping: which layer of a model keeps which channels when channel groups are
removed physically, written once for every backend.

:func:`compaction_cuts` checks the kept channels per group (:func:`~prunekit.decisions.channel_groups.check_keep`,
so nothing is built on bad input) and turns them into one :class:`LayerCut` per conv/linear layer
and kept indices per norm layer; :func:`narrowed_modules` walks a copy of the model and asks the
backend for each narrowed module. A backend's ``compact.py`` only narrows one conv, one linear,
one norm and puts the new module in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.decisions.channel_groups import check_keep, find_channel_groups, layer_slices


@dataclass(frozen=True)
class LayerCut:
    """The slices one conv or linear layer keeps; None keeps the whole axis."""

    name: str
    kind: str                      # "conv" or "linear" (:class:`~prunekit.contract.layers.LayerInfo`)
    out_idx: Optional[np.ndarray]  # output rows (a depthwise conv: its channels, input and groups alike)
    in_idx: Optional[np.ndarray]   # input columns (after a flatten: whole blocks of ``spatial`` columns)
    depthwise: bool


@dataclass(frozen=True)
class CompactionCuts:
    layers: List[LayerCut]
    norms: Dict[str, np.ndarray]   # norm layer -> kept channels


def compaction_cuts(handle, keep: Dict[str, Sequence[int]]) -> CompactionCuts:
    """What compacting ``handle``'s model to ``keep`` (kept channels per group name; groups not
    named keep all) does to each layer. Raises on bad input before anything is built."""
    groups = find_channel_groups(handle)
    kept = check_keep(groups, keep)
    out_keep, in_keep, norm_keep, dw_keep = layer_slices(groups, kept)
    kinds = {l.name: l.kind for l in handle.layers}
    layers = [LayerCut(name, kinds[name], dw_keep.get(name, out_keep.get(name)), in_keep.get(name), name in dw_keep)
              for name in sorted(set(out_keep) | set(in_keep) | set(dw_keep))]
    return CompactionCuts(layers, norm_keep)


NarrowLayer = Callable[[object, LayerCut], object]


def narrowed_modules(cuts: CompactionCuts, modules: Dict[str, object], narrow_conv: NarrowLayer,
                     narrow_linear: NarrowLayer, narrow_norm: Callable[[object, np.ndarray, str], object]
                     ) -> Iterator[Tuple[str, object, object]]:
    """``(path, old module, new module)`` for every layer, then every norm, that ``cuts`` narrows
    (``narrow_conv(old, cut)`` or ``narrow_linear(old, cut)`` by the layer's kind,
    ``narrow_norm(old, kept, path)``); ``modules`` maps paths to the modules of the model copy
    being compacted."""
    for cut in cuts.layers:
        old = modules[cut.name]
        yield cut.name, old, (narrow_conv if cut.kind == "conv" else narrow_linear)(old, cut)
    for name, idx in cuts.norms.items():
        old = modules[name]
        yield name, old, narrow_norm(old, idx, name)
