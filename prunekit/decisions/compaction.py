"""Compaction bookkeeping: which layer of a model keeps which channels when channel groups are
removed physically, written once for every backend.

:func:`compaction_cuts` checks the kept channels per group (:func:`~prunekit.decisions.channel_groups.check_keep`,
so nothing is built on bad input) and turns them into one :class:`LayerCut` per conv/linear layer
and kept indices per norm layer; :func:`narrowed_modules` walks a copy of the model and asks the
backend for each narrowed module. A backend's ``compact.py`` only narrows one conv, one linear,
one norm and puts the new module in place (:func:`grouped_columns` for a grouped conv's weight).

Never silently wrong: :func:`first_disagreement` compares, layer by layer in execution order,
the compacted model's outputs with the masked model's (the same model with the removed
channels' producer rows and norm parameters zeroed, :func:`~prunekit.decisions.channel_groups.zeroed_entries`)
on one probe batch, and the backend refuses the compaction naming the first layer whose kept
outputs differ by more than :func:`tolerance` relative to that layer's largest masked output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.errors import ModelError
from prunekit.decisions.channel_groups import check_keep, find_channel_groups, layer_slices


@dataclass(frozen=True)
class LayerCut:
    """The slices one conv or linear layer keeps; None keeps the whole axis."""

    name: str
    kind: str                      # "conv" or "linear" (:class:`~prunekit.contract.layers.LayerInfo`)
    out_idx: Optional[np.ndarray]  # output rows (a depthwise conv: its channels, input and groups alike)
    in_idx: Optional[np.ndarray]   # input columns (after a flatten: whole blocks of ``spatial`` columns)
    depthwise: bool
    groups: int = 1                # a grouped (not depthwise) conv's groups; its cut is balanced per group


@dataclass(frozen=True)
class CompactionCuts:
    layers: List[LayerCut]
    norms: Dict[str, np.ndarray]   # norm layer -> kept channels


def compaction_cuts(handle, keep: Dict[str, Sequence[int]], groups=None) -> CompactionCuts:
    """What compacting ``handle``'s model to ``keep`` (kept channels per group name; groups not
    named keep all) does to each layer. Raises on bad input before anything is built.
    ``groups``: the model's channel groups, found here when not given."""
    groups = find_channel_groups(handle) if groups is None else groups
    kept = check_keep(groups, keep)
    out_keep, in_keep, norm_keep, dw_keep = layer_slices(groups, kept)
    info = {l.name: l for l in handle.layers}
    order = {l.name: i for i, l in enumerate(handle.layers)}
    layers = [LayerCut(name, info[name].kind, dw_keep.get(name, out_keep.get(name)), in_keep.get(name),
                       name in dw_keep, 1 if name in dw_keep else int(info[name].groups))
              for name in sorted(set(out_keep) | set(in_keep) | set(dw_keep), key=order.get)]
    return CompactionCuts(layers, norm_keep)


def grouped_columns(cut: LayerCut, in_channels: int, out_channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """For a grouped conv (``cut.groups`` > 1, not depthwise) whose weight is (out, in/groups, ...):
    the kept output rows and, per kept row, the kept columns of its group as indices into the
    weight's second axis (a (rows, kept in/groups) array). The group's balance
    (:func:`~prunekit.decisions.channel_groups.check_keep`) makes every group keep as many."""
    g = cut.groups
    rows = np.arange(out_channels) if cut.out_idx is None else np.asarray(cut.out_idx, np.int64)
    cols = np.arange(in_channels) if cut.in_idx is None else np.asarray(cut.in_idx, np.int64)
    per_in, per_out = in_channels // g, out_channels // g
    local = (cols - (cols // per_in) * per_in).reshape(g, -1)
    return rows, local[rows // per_out]


def tolerance(dtype_name: str) -> float:
    """Largest relative difference (max abs difference over max abs of the masked output, per
    layer) accepted between a compacted model and its masked model: 1e-4 in float32 (float64:
    1e-9); 2e-2 in float16 and 1e-1 in bfloat16, whose 11 and 8 significant bits round sums of
    different lengths differently."""
    name = str(dtype_name).lower()
    if "bfloat16" in name:
        return 1e-1
    if "float16" in name or "half" in name:
        return 2e-2
    if "float64" in name or "double" in name:
        return 1e-9
    return 1e-4


def first_disagreement(cuts: CompactionCuts, masked: Dict[str, np.ndarray], compacted: Dict[str, np.ndarray],
                       order: Sequence[str], tol: float) -> Optional[Tuple[str, float]]:
    """``(layer, relative difference)`` of the first layer in ``order`` (execution order; the last
    entry may be the model's output) whose compacted output differs from the masked model's kept
    outputs (channel axis 1) by more than ``tol`` relative to the masked output's largest
    magnitude; None when all agree. ``masked``/``compacted``: float arrays by layer name."""
    out_idx = {c.name: c.out_idx for c in cuts.layers}
    for name in order:
        if name not in masked or name not in compacted:
            continue
        ref = np.asarray(masked[name], np.float64)
        got = np.asarray(compacted[name], np.float64)
        idx = out_idx.get(name)
        if idx is not None and ref.ndim >= 2:
            ref = np.take(ref, np.asarray(idx, np.int64), axis=1)
        if ref.shape != got.shape:
            return name, float("inf")
        if not np.all(np.isfinite(ref)):
            continue
        scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
        diff = float(np.abs(ref - got).max()) / scale if ref.size else 0.0
        if not np.isfinite(diff) or diff > tol:
            return name, diff
    return None


NarrowLayer = Callable[[object, LayerCut], object]


def refuse_disagreement(model_name: str, cuts: CompactionCuts, masked: Dict[str, np.ndarray],
                        compacted: Dict[str, np.ndarray], order: Sequence[str], dtype_name: str) -> None:
    """Raise :class:`ModelError` naming the first layer where the compacted model's outputs differ
    from the masked model's beyond the dtype's :func:`tolerance` (both backends' compaction check)."""
    tol = tolerance(dtype_name)
    bad = first_disagreement(cuts, masked, compacted, order, tol)
    if bad is not None:
        layer, diff = bad
        where = "the model's output" if layer == "<output>" else f"layer {layer!r}"
        raise ModelError(f"compaction of {model_name!r} refused: the compacted model's {where} differs from "
                         f"the masked model's by {diff:.3g} relative (tolerance {tol:g}); an operation between "
                         "the layers does not map removed (zero) channels to zero or mixes channels the "
                         "groups did not see. The model is unchanged")


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
