"""FLOPs of a channel-pruned model as a quadratic function of the per-group keep ratios.

With channel groups (``prunekit.decisions.channel_groups``) a conv or linear layer whose output channels are
group ``i`` and whose input channels are group ``j`` costs ``α_i·α_j`` times its dense cost when
the groups keep the fractions ``α`` of their channels; a layer fed by the image (or writing the
logits) scales with one ratio only, and a depthwise conv with its group's ratio. Hence

    F(α) = Σ_ij α_i α_j A_ij + Σ_i α_i B_i + F_0

(DSA, ALGORITHMS.md §3), with ``A_ij`` the dense cost of the layers from group ``j`` into group
``i``, ``B_i`` the costs that scale with ``α_i`` alone and ``F_0`` what no ratio changes. Costs
are MACs per sample, counted as :mod:`prunekit.decisions.flops` counts them (every weight entry costs one
MAC per output position), so where ``α_i·C_i`` is an integer for every group, ``F(α)`` equals
``count_model``'s ``dense_macs`` of the model compacted to those channel counts exactly.

Groups marked not prunable (the image, the logits) keep ratio 1: their terms enter ``B`` and
``F_0`` through :meth:`ChannelFlops.full_ratios`. The module is plain NumPy (float64).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from prunekit.contract.layers import LayerInfo
from prunekit.errors import ModelError


def layer_macs(layer: LayerInfo) -> int:
    """Dense MACs of one layer per sample, as :func:`prunekit.decisions.flops.count_layer` counts them."""
    return int(layer.numel) * int(layer.macs_per_weight)


class ChannelFlops:
    """The quadratic FLOPs model of a model's channel groups.

    ``groups``: :class:`prunekit.decisions.channel_groups.ChannelGroup` objects (anything with ``name``,
    ``size``, ``producers``, ``consumers``, ``depthwise``, ``prunable``); ``layers``: the model's
    :class:`LayerInfo` list. A layer may hold pieces of several groups in one role (a consumer of
    a concatenation, a producer whose output is split; sizes of the pieces give their shares of
    its cost); layers in no group cost a constant.
    """

    def __init__(self, groups: Sequence, layers: Sequence[LayerInfo]):
        self.groups = list(groups)
        self.names = [g.name for g in self.groups]
        if len(set(self.names)) != len(self.names):
            raise ModelError(f"channel group names are not unique: {self.names}")
        self.sizes = np.array([int(g.size) for g in self.groups], dtype=np.int64)
        self.prunable = np.array([bool(g.prunable) for g in self.groups])
        # layer -> [(group index, channels)]: a layer reading a concatenation (or whose output is
        # split) holds pieces of several groups; a piece of f of its channels scales its cost by f
        out_of: Dict[str, list] = {}
        in_of: Dict[str, list] = {}
        dw_of: Dict[str, list] = {}
        for gi, g in enumerate(self.groups):
            for table, members in ((out_of, g.producers), (in_of, g.consumers), (dw_of, g.depthwise)):
                for layer in members:
                    table.setdefault(layer, []).append((gi, int(g.size)))
        known = {l.name for l in layers}
        for table in (out_of, in_of, dw_of):
            missing = sorted(set(table) - known)
            if missing:
                raise ModelError(f"channel groups name layers the model does not have: {missing[:3]}")

        def shares(pieces):
            total = float(sum(n for _, n in pieces))
            return [(gi, n / total) for gi, n in pieces]

        n = len(self.groups)
        self.A = np.zeros((n, n), dtype=np.float64)
        self.B = np.zeros(n, dtype=np.float64)
        self.const = 0.0
        self.dense = 0.0
        for layer in layers:
            cost = float(layer_macs(layer))
            self.dense += cost
            if layer.name in dw_of:
                for gi, f in shares(dw_of[layer.name]):
                    self.B[gi] += cost * f
                continue
            outs, ins = out_of.get(layer.name), in_of.get(layer.name)
            if outs and ins:
                for o, fo in shares(outs):
                    for i, fi in shares(ins):
                        self.A[o, i] += cost * fo * fi
            elif outs or ins:
                for gi, f in shares(outs or ins):
                    self.B[gi] += cost * f
            else:
                self.const += cost

    # ------------------------------------------------------------------ evaluation
    def full_ratios(self, ratios: Dict[str, float] | np.ndarray | None = None) -> np.ndarray:
        """A ratio vector over all groups: the given ratios (by name or as a vector), 1 elsewhere,
        and 1 for every group that is not prunable."""
        alpha = np.ones(len(self.groups), dtype=np.float64)
        if isinstance(ratios, dict):
            unknown = sorted(set(ratios) - set(self.names))
            if unknown:
                raise ModelError(f"unknown channel group(s) {unknown[:3]}; groups: {self.names}")
            for k, v in ratios.items():
                alpha[self.names.index(k)] = float(v)
        elif ratios is not None:
            alpha = np.asarray(ratios, dtype=np.float64).copy()
            if alpha.shape != (len(self.groups),):
                raise ModelError(f"expected {len(self.groups)} ratios, got shape {alpha.shape}")
        alpha[~self.prunable] = 1.0
        return alpha

    def flops(self, alpha: np.ndarray) -> float:
        """F(α) in MACs per sample."""
        a = np.asarray(alpha, dtype=np.float64)
        return float(a @ self.A @ a + self.B @ a + self.const)

    def gradient(self, alpha: np.ndarray) -> np.ndarray:
        """∂F/∂α = (A + Aᵀ) α + B (non-negative for non-negative α)."""
        a = np.asarray(alpha, dtype=np.float64)
        return (self.A + self.A.T) @ a + self.B

    def flops_of_counts(self, counts: Dict[str, int] | np.ndarray) -> float:
        """F at the ratios ``count / size`` (the FLOPs of the model compacted to those counts)."""
        if isinstance(counts, dict):
            c = self.sizes.astype(np.float64).copy()
            for k, v in counts.items():
                c[self.names.index(k)] = float(v)
        else:
            c = np.asarray(counts, dtype=np.float64)
        return self.flops(self.full_ratios(c / self.sizes))

    def dense_flops(self) -> float:
        """F at α = 1: the dense model's MACs (``count_model``'s ``dense_macs``)."""
        return self.flops(np.ones(len(self.groups)))
