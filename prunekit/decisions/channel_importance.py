"""How much each channel of a channel group matters: the channel importances (issue #11).

One score per channel of every prunable :class:`~prunekit.decisions.channel_groups.ChannelGroup`,
larger meaning "keep". The channel baseline (:mod:`prunekit.algorithms.channel`) ranks channels
by them, globally across groups or within each group, so every score here is normalised to be
comparable between groups of different fan-in and different numbers of producers:

* ``"l1"`` (the default; Li et al. 2017): the L1 norm of the channel's producer filter rows,
  summed over the group's producers, divided by the number of weights summed (a mean ``|w|``);
* ``"l2"``: the root mean square of the same weights;
* ``"bn_scale"`` (network slimming, Liu et al. 2017): the mean ``|gamma|`` of the norms over the
  group (BatchNorm, or any norm whose per-channel ``weight`` the group slices); a group with no
  such scale cannot be scored and is refused with a :class:`ModelError` naming it;
* ``"taylor"`` (first-order Taylor, Molchanov et al. 2019): the mean over the producer weights of
  ``|w * dL/dw|``, averaged over the gradient batches seen (:class:`TaylorAccumulator`);
* ``"lamp"`` (layer-adaptive magnitude pruning, Lee et al. 2021, on channels): with ``e_i`` the
  channel's summed squared producer weights, ``e_i / sum of e_j over the channels j of the same
  group whose e_j >= e_i`` (ties by index): the best channel of every group scores 1, so a global
  ranking removes from each group in proportion to how flat its spectrum of energies is.

Depthwise convs carry a group's channels but do not score (as in the L1 rule they are the
group's, not the channel's, cost). Everything here is NumPy on arrays the model handle returns
(``weights_numpy``, ``state_numpy``, gradients via the handle's ops): no framework is named.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

from prunekit.errors import ConfigError, ModelError

#: the channel importances, by setting value
IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "lamp")
#: the importances that need gradients (a training batch) before the decision
NEEDS_GRADIENTS = ("taylor",)


def check_importance(name) -> str:
    """``name`` if it is one of :data:`IMPORTANCES`; otherwise a one-line :class:`ConfigError`."""
    if name not in IMPORTANCES:
        raise ConfigError(f"importance {name!r} is not known; allowed: {', '.join(IMPORTANCES)}")
    return name


def _producer_rows(g, arrays: Mapping[str, np.ndarray]) -> List[np.ndarray]:
    """The group's rows of each producer's weight (a group may be a range of a layer's outputs)."""
    rows = []
    for p in g.producers:
        w = np.asarray(arrays[p], np.float64)
        first = int(getattr(g, "out_offsets", {}).get(p, 0))
        rows.append(w[first:first + g.size].reshape(g.size, -1))
    return rows


def _mean_over_rows(rows: List[np.ndarray], fn) -> np.ndarray:
    total = np.zeros(rows[0].shape[0] if rows else 0, np.float64)
    count = 0
    for w in rows:
        total += fn(w).sum(axis=1)
        count += w.shape[1]
    return total / max(1, count)


def _lamp(energy: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(energy.size), energy))  # ascending energy, index on ties
    tail = np.cumsum(energy[order][::-1])[::-1]           # sum over this and every larger channel
    out = np.empty_like(energy)
    out[order] = np.where(tail > 0, energy[order] / np.where(tail > 0, tail, 1.0), 0.0)
    return out


def channel_importance(groups: Iterable, importance: str, weights: Mapping[str, np.ndarray],
                       state: Optional[Mapping[str, np.ndarray]] = None,
                       taylor: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Per prunable group, the float64 score of each of its channels (module docstring).

    ``weights``: the prunable layers' weights by layer name (``handle.weights_numpy()``);
    ``state``: the whole state by shared name (``handle.state_numpy()``), for ``"bn_scale"``;
    ``taylor``: per producer layer, ``|w * grad|`` averaged over batches (weight-shaped), for
    ``"taylor"`` (:meth:`TaylorAccumulator.result`)."""
    check_importance(importance)
    out: Dict[str, np.ndarray] = {}
    for g in groups:
        if not g.prunable:
            continue
        if importance == "l1":
            out[g.name] = _mean_over_rows(_producer_rows(g, weights), np.abs)
        elif importance == "l2":
            out[g.name] = np.sqrt(_mean_over_rows(_producer_rows(g, weights), np.square))
        elif importance == "lamp":
            out[g.name] = _lamp(sum(np.square(w).sum(axis=1) for w in _producer_rows(g, weights)))
        elif importance == "taylor":
            if taylor is None or any(p not in taylor for p in g.producers):
                raise ModelError(f"importance 'taylor' needs the gradients of group {g.name!r}'s producers; "
                                 "none were observed (decide after at least one training step)")
            out[g.name] = _mean_over_rows(_producer_rows(g, taylor), np.abs)
        else:  # bn_scale
            offsets = getattr(g, "in_offsets", {})
            scales = [np.abs(np.asarray(state[f"{nm}.weight"], np.float64).ravel())
                      [offsets.get(nm, 0):offsets.get(nm, 0) + g.size]
                      for nm in g.norms if state is not None and f"{nm}.weight" in state]
            scales = [s for s in scales if s.size == g.size]
            if not scales:
                raise ModelError(f"importance 'bn_scale' needs a norm with a per-channel scale over group "
                                 f"{g.name!r}, which has none; use another importance or put its producers "
                                 "in ignored_layers")
            out[g.name] = np.mean(scales, axis=0)
    return out


class TaylorAccumulator:
    """Running mean of ``|w * grad|`` per layer, over the gradient batches an algorithm observes.
    ``add`` takes framework tensors and converts with the handle's ops."""

    def __init__(self, ops, layers: Iterable[str]):
        self.ops = ops
        self.layers = list(layers)
        self.sums: Dict[str, np.ndarray] = {}
        self.batches = 0

    def add(self, weights: Mapping[str, object], grads: Mapping[str, object]) -> None:
        for n in self.layers:
            if n not in grads:
                continue
            term = np.abs(np.asarray(self.ops.to_numpy(weights[n]), np.float64)
                          * np.asarray(self.ops.to_numpy(grads[n]), np.float64))
            self.sums[n] = self.sums[n] + term if n in self.sums else term
        self.batches += 1

    def result(self) -> Optional[Dict[str, np.ndarray]]:
        """Per layer, the mean over batches; None before the first batch."""
        if not self.batches:
            return None
        return {n: s / self.batches for n, s in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": {n: np.asarray(s) for n, s in self.sums.items()}, "batches": int(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {n: np.asarray(s, np.float64) for n, s in (state.get("sums") or {}).items()}
        self.batches = int(state.get("batches", 0))
