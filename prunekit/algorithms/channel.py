"""Group-aware channel pruning by filter L1 norm: the neutral channel baseline (issue #4).

One-shot L1-norm filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets")
applied to whole channel groups (:mod:`prunekit.decisions.channel_groups`), then fine-tuning at the pruned
structure. The channel-pruning algorithms' benchmarks compare against it.

Rule (see docs/DECISIONS.md, "Channel groups and compaction"):

* a channel's score is the L1 norm of its producer filters summed over the group's producers,
  divided by the number of weights summed (a mean |w|, so groups of different fan-in and with
  different numbers of producers compare fairly); depthwise filters and BatchNorms do not score;
* channels are removed globally in ascending score order (ties: group order, then channel
  index) until the target is met: ``target="flops"`` keeps at most ``keep_ratio`` of the dense
  MACs of the prunable layers (counted on the compacted shapes), ``target="channels"`` keeps
  ``keep_count(total, 1 - keep_ratio)`` of the prunable groups' channels; a group never loses
  its last channel (it is skipped once it has one left); with ``round_to=k`` channels leave in
  units of ``k`` (ranked by their mean score) so that every group keeps a multiple of ``k``
  (convolution kernels run much faster on channel counts that are multiples of 8: MobileNetV2
  at half its MACs ran 1.7x faster with ``round_to=8`` than without, PyTorch, one CPU thread);
* the decision is taken at step ``floor(at_fraction * (total_steps - 1))`` (default: before the
  first step) from the weights then, and held: masks zero the removed channels' producer rows,
  depthwise rows and consumer columns, so the masked model computes exactly what the compacted
  model computes (whatever the BatchNorms add to a removed channel, nothing reads it).

After :meth:`finish`, ``channel_keep`` holds the kept indices per group name; ``job.run`` then
compacts the model (``backend.compact``) and reports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.decisions.channel_groups import ChannelGroup, find_channel_groups
from prunekit.decisions.selection import keep_count, top_channels
from prunekit.errors import ConfigError, ModelError

TARGETS = ("flops", "channels")
ALLOCATIONS = ("global", "uniform")


@dataclass
class ChannelConfig:
    keep_ratio: float = 0.5     # fraction of the prunable layers' MACs (or of the channels) kept
    target: str = "flops"       # "flops" or "channels"
    at_fraction: float = 0.0    # when to decide, as a fraction of the pruning steps
    round_to: int = 1           # keep a multiple of this many channels per group (8: faster kernels)
    allocation: str = "global"  # "global": one L1 ranking over all groups; "uniform": same fraction per group

    def __post_init__(self):
        try:
            self.keep_ratio = float(self.keep_ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}") from None
        if not (0.0 < self.keep_ratio <= 1.0) or math.isnan(self.keep_ratio):
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")
        if not (0.0 <= float(self.at_fraction) <= 1.0):
            raise ConfigError(f"at_fraction must be in [0, 1], got {self.at_fraction}")


def group_scores(groups: List[ChannelGroup], weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per prunable group, each channel's summed producer-filter L1 norm over the number of
    weights summed (float64)."""
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        total = np.zeros(g.size, np.float64)
        count = 0
        for p in g.producers:
            w = np.asarray(weights[p], np.float64).reshape(g.size, -1)
            total += np.abs(w).sum(axis=1)
            count += w.shape[1]
        out[g.name] = total / max(1, count)
    return out


class MacModel:
    """Dense MACs of the model's prunable layers as a function of the kept channels per group
    (what :func:`prunekit.decisions.flops.count_model` measures after compaction)."""

    def __init__(self, layers, groups: List[ChannelGroup]):
        out_of, in_of = {}, {}
        for g in groups:
            for p in g.producers + g.depthwise:
                out_of[p] = g.name
            for c in g.consumers:
                in_of[c] = (g.name, int(g.spatial.get(c, 1)))
        # per layer: (MACs per (out, in) channel pair, out group, out size, in group, in size)
        self.terms = []
        for l in layers:
            unit = l.macs_per_weight * (int(np.prod(l.weight_shape[2:])) if l.kind == "conv" else 1)
            if l.name in out_of and l.is_depthwise:
                self.terms.append((unit, out_of[l.name], l.out_channels, None, 1))
                continue
            gi, s = in_of.get(l.name, (None, 1))
            self.terms.append((unit * s, out_of.get(l.name), l.out_channels, gi, l.weight_shape[1] // s))
        self.by_group: Dict[str, List[int]] = {}
        for i, (_, go, _, gi, _) in enumerate(self.terms):
            for g in {go, gi} - {None}:
                self.by_group.setdefault(g, []).append(i)

    def _sizes(self, term, kept):
        unit, go, no, gi, ni = term
        return unit, (kept.get(go, no) if go else no), (kept.get(gi, ni) if gi else ni)

    def macs(self, kept: Dict[str, int]) -> int:
        total = 0
        for t in self.terms:
            unit, ko, ki = self._sizes(t, kept)
            total += unit * ko * ki
        return total

    def saving(self, group: str, kept: Dict[str, int]) -> int:
        """MACs saved by removing one more channel of ``group``."""
        total = 0
        for i in self.by_group.get(group, ()):
            t = self.terms[i]
            unit, ko, ki = self._sizes(t, kept)
            if t[1] == group and t[3] == group:
                total += unit * (ko * ki - (ko - 1) * (ki - 1))
            elif t[1] == group:
                total += unit * ki
            else:
                total += unit * ko
        return total


def _uniform_counts(sizes: Dict[str, int], fraction: float, round_to: int) -> Dict[str, int]:
    """Each group's count at ``fraction`` of its size, rounded up to a multiple of ``round_to``,
    at least one unit (``round_to`` channels, or the whole group if it is smaller), at most all."""
    out = {}
    for n, size in sizes.items():
        k = round_to * math.ceil(fraction * size / round_to - 1e-9)
        out[n] = int(min(size, max(k, min(round_to, size))))
    return out


def _choose_uniform(layers, groups, scores, sizes, keep_ratio, target, round_to) -> Dict[str, np.ndarray]:
    model = MacModel(layers, groups)
    total_macs, total = model.macs({}), sum(sizes.values())

    def fits(counts):
        if target == "flops":
            return model.macs(counts) <= keep_ratio * total_macs
        return sum(counts.values()) <= keep_count(total, 1.0 - keep_ratio)

    floor = _uniform_counts(sizes, 0.0, round_to)
    if not fits(floor):
        what = f"{model.macs(floor) / total_macs:.3f} of the MACs" if target == "flops" else \
            f"{sum(floor.values())} of {total} channels"
        raise ModelError(f"keep_ratio {keep_ratio:g} cannot be reached with allocation=uniform and "
                         f"round_to={round_to}: the smallest is {what}")
    # the counts only change where fraction * size crosses a multiple of round_to: try those
    fractions = sorted({min(1.0, j * round_to / s) for s in sizes.values() for j in range(1, s // round_to + 2)}
                       | {1.0})
    best = floor
    for f in fractions:
        counts = _uniform_counts(sizes, f, round_to)
        if not fits(counts):
            break
        best = counts
    return {n: top_channels(scores[n], best[n]) for n in sizes}


def choose_channels(layers, groups: List[ChannelGroup], weights: Dict[str, np.ndarray], keep_ratio: float,
                    target: str = "flops", round_to: int = 1, allocation: str = "global") -> Dict[str, np.ndarray]:
    """The kept channel indices per prunable group under the rule in the module docstring.

    With ``round_to`` > 1 every group keeps a multiple of ``round_to`` channels (or all of them,
    or, for a group smaller than ``round_to``, all): channels leave in units of ``round_to`` (the
    group's ``size % round_to`` lowest-scoring first), units ranked by their mean score.
    ``allocation="uniform"``: the same fraction of every group (module docstring)."""
    scores = group_scores(groups, weights)
    if not scores:
        raise ModelError("the model has no prunable channel group")
    round_to = int(round_to)
    if round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        sizes = {g.name: g.size for g in groups if g.name in scores}
        return _choose_uniform(layers, groups, scores, sizes, keep_ratio, target, round_to)
    names = [g.name for g in groups if g.name in scores]
    sizes = {g.name: g.size for g in groups}
    units = []  # (mean score, group position, first channel, channels)
    for gi, n in enumerate(names):
        order = np.lexsort((np.arange(sizes[n]), scores[n]))  # score ascending, index on ties
        first = sizes[n] % round_to
        bounds = ([0, first] if first else [0]) + list(range(first + round_to, sizes[n] + 1, round_to))
        chunks = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        for c in chunks[:-1]:  # the best unit stays: at least one channel (round_to) per group
            units.append((float(scores[n][c].mean()), gi, int(c.min()), c))
    units.sort(key=lambda u: u[:3])
    kept = {n: sizes[n] for n in names}
    removed = {n: [] for n in names}
    model = MacModel(layers, groups)
    macs = model.macs({})
    goal = keep_ratio * macs
    total = int(sum(sizes[n] for n in names))
    to_remove = total - keep_count(total, 1.0 - keep_ratio)
    count = 0
    for _, gi, _, chans in units:
        if (macs <= goal) if target == "flops" else (count >= to_remove):
            break
        n = names[gi]
        for c in chans:
            macs -= model.saving(n, kept)
            kept[n] -= 1
            removed[n].append(int(c))
            count += 1
    if target == "flops" and macs > goal:
        raise ModelError(f"keep_ratio {keep_ratio:g} of the MACs cannot be reached with round_to={round_to}: "
                         f"the smallest is {macs / model.macs({}):.3f}")
    return {n: np.setdiff1d(np.arange(sizes[n]), np.asarray(removed[n], np.int64)) for n in names}


def channel_masks(handle, groups: List[ChannelGroup], keep: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Float32 masks (weight shapes) zeroing removed channels' producer rows, depthwise rows and
    consumer columns."""
    shapes = {l.name: tuple(l.weight_shape) for l in handle.layers}
    masks: Dict[str, np.ndarray] = {}

    def get(name):
        if name not in masks:
            masks[name] = np.ones(shapes[name], np.float32)
        return masks[name]

    for g in groups:
        if g.name not in keep or len(keep[g.name]) == g.size:
            continue
        gone = np.setdiff1d(np.arange(g.size), keep[g.name])
        for p in g.producers + g.depthwise:
            get(p)[gone] = 0.0
        for c in g.consumers:
            s = int(g.spatial.get(c, 1))
            cols = (gone[:, None] * s + np.arange(s)[None, :]).ravel()
            get(c)[:, cols] = 0.0
    return masks


@register_algorithm
class ChannelPruner(Algorithm):
    name = "channel"
    config_class = ChannelConfig

    def __init__(self, config: Optional[ChannelConfig] = None, **kwargs):
        super().__init__()
        self.config = config or ChannelConfig(**kwargs)
        self.groups: List[ChannelGroup] = []
        self.channel_keep: Dict[str, np.ndarray] = {}
        self.decide_step = 0

    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        self.groups = find_channel_groups(handle)
        if not any(g.prunable for g in self.groups):
            raise ModelError(f"{handle.model_name!r} has no prunable channel group")
        self.decide_step = int(math.floor(self.config.at_fraction * max(0, self.total_steps - 1)))
        return self

    def before_step(self, step: int) -> None:
        if not self.channel_keep and step >= self.decide_step:
            self.decide()

    def finish(self) -> None:
        if not self.channel_keep:
            self.decide()

    def decide(self) -> None:
        weights = {n: np.asarray(w) for n, w in self.handle.weights_numpy().items()}
        keep = choose_channels(self.handle.layers, self.groups, weights, self.config.keep_ratio, self.config.target,
                               self.config.round_to, self.config.allocation)
        masks = channel_masks(self.handle, self.groups, keep)
        self.channel_keep = keep
        self.set_masks({n: self.ops.asarray(m, like=self.handle.weight(n)) for n, m in masks.items()})

    def describe(self) -> dict:
        c = self.config
        return {"keep_ratio": c.keep_ratio, "target": c.target, "at_fraction": c.at_fraction, "round_to": c.round_to,
                "allocation": c.allocation,
                "rule": ("group L1 of producer filters / weights summed, global ascending, >= 1 per group"
                         if c.allocation == "global" else
                         "same fraction of every group (rounded up to round_to), best group-L1 channels kept")}

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["channel_keep"] = {k: np.asarray(v, np.int64) for k, v in self.channel_keep.items()}
        return d

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        names = {g.name for g in self.groups}
        keep = state.get("channel_keep", {}) or {}
        bad = sorted(set(keep) - names)
        if bad:
            from prunekit.errors import PlanError
            raise PlanError(f"channel state names group(s) {bad[:3]} that model {self.handle.model_name!r} lacks")
        self.channel_keep = {k: np.asarray(v, np.int64) for k, v in keep.items()}
