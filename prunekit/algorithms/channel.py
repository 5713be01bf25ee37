"""Group-aware channel pruning by filter L1 norm: the neutral channel baseline (issue #4).

One-shot L1-norm filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets")
applied to whole channel groups (:mod:`prunekit.decisions.channel_groups`), then fine-tuning at the pruned
structure. The channel-pruning algorithms' benchmarks compare against it.

Rule (see docs/DECISIONS.md, "Channel groups and compaction"):

* a channel's score is its ``importance`` (:mod:`prunekit.decisions.channel_importance`:
  ``l1`` by default, the L1 norm of its producer filters summed over the group's producers,
  divided by the number of weights summed, so groups of different fan-in and with different
  numbers of producers compare fairly; or ``l2``, ``bn_scale``, ``taylor``, ``lamp``);
* channels are removed globally in ascending score order (ties: group order, then channel
  index) until the target is met. What a ratio means is in its name: ``macs_kept`` (the
  default, 0.5) keeps at most that fraction of the dense MACs of the prunable layers (counted
  on the compacted shapes); ``channels_removed`` removes that fraction of the prunable groups'
  channels (``keep_count``); the older pair ``keep_ratio`` + ``target`` ("flops" / "channels":
  the fraction *kept* of either) still works; a group never loses its last channel (it is
  skipped once it has one left), nor more than ``max_removed`` of its channels (or the
  ``max_removed_by_layer`` entry of one of its producers); a group produced (or carried as a
  depthwise conv) by a layer of ``ignored_layers`` (names or module prefixes) keeps all its
  channels, while the ignored layer's input channels follow their producers, as in
  Torch-Pruning; a target out of reach is a :class:`ModelError`; with ``round_to=k`` channels leave in
  units of ``k`` (ranked by their mean score) so that every group keeps a multiple of ``k``
  (convolution kernels run much faster on channel counts that are multiples of 8: MobileNetV2
  at half its MACs ran 1.7x faster with ``round_to=8`` than without, PyTorch, one CPU thread);
* the decision is taken at step ``floor(at_fraction * (total_steps - 1))`` (default: before the
  first step; after that step's gradients for ``taylor``, which averages ``|w * grad|`` over the
  steps up to it) from the weights then, and held: masks zero the removed channels' producer rows,
  depthwise rows and consumer columns, so the masked model computes exactly what the compacted
  model computes (whatever the BatchNorms add to a removed channel, nothing reads it).

After :meth:`finish`, ``channel_keep`` holds the kept indices per group name; ``job.run`` then
compacts the model (``backend.compact``) and reports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.decisions.channel_groups import ChannelGroup, find_channel_groups
from prunekit.decisions.channel_importance import (NEEDS_GRADIENTS, TaylorAccumulator, channel_importance,
                                                   check_importance)
from prunekit.decisions.selection import keep_count, top_channels
from prunekit.errors import ConfigError, ModelError

TARGETS = ("flops", "channels")
ALLOCATIONS = ("global", "uniform")


#: what a ratio setting means: the fraction of the prunable layers' dense MACs kept, or the
#: fraction of the prunable groups' channels removed (docs/DECISIONS.md, "What a channel ratio means")
RATIO_SETTINGS = ("macs_kept", "channels_removed")
#: the default when no ratio setting is given: half the MACs kept
DEFAULT_MACS_KEPT = 0.5


def _fraction(key: str, value, low_open: bool, high_open: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v < 1.0 if high_open else v <= 1.0
    if math.isnan(v) or not (lo_ok and hi_ok):
        allowed = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be a number in {allowed}, got {value!r}")
    return v


@dataclass
class ChannelConfig:
    # how much to prune: give at most one of macs_kept / channels_removed (or the older pair
    # keep_ratio + target); none given: macs_kept=0.5
    macs_kept: Optional[float] = None         # fraction of the prunable layers' dense MACs kept, in (0, 1]
    channels_removed: Optional[float] = None  # fraction of the prunable groups' channels removed, in [0, 1)
    keep_ratio: Optional[float] = None        # older name: fraction kept of what `target` counts
    target: Optional[str] = None              # with keep_ratio: "flops" (MACs) or "channels"
    importance: str = "l1"      # channel score: l1, l2, bn_scale, taylor, lamp (decisions/channel_importance.py)
    ignored_layers: Sequence[str] = field(default_factory=tuple)  # layers (or module prefixes) keeping their outputs
    max_removed: float = 1.0    # at most this fraction of any group's channels removed
    max_removed_by_layer: Dict[str, float] = field(default_factory=dict)  # per producer layer (or prefix)
    at_fraction: float = 0.0    # when to decide, as a fraction of the pruning steps
    round_to: int = 1           # keep a multiple of this many channels per group (8: faster kernels)
    allocation: str = "global"  # "global": one ranking over all groups; "uniform": same fraction per group

    def __post_init__(self):
        given = [k for k in RATIO_SETTINGS if getattr(self, k) is not None]
        old = [k for k in ("keep_ratio", "target") if getattr(self, k) is not None]
        if len(given) > 1 or (given and old):
            raise ConfigError(f"give one of macs_kept, channels_removed (or keep_ratio with target), "
                              f"got {', '.join(given + old)}")
        if self.macs_kept is not None:
            self.macs_kept = _fraction("macs_kept", self.macs_kept, True, False)
        if self.channels_removed is not None:
            self.channels_removed = _fraction("channels_removed", self.channels_removed, False, True)
        if self.keep_ratio is not None:
            self.keep_ratio = _fraction("keep_ratio", self.keep_ratio, True, False)
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        check_importance(self.importance)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")
        if not (0.0 <= float(self.at_fraction) <= 1.0):
            raise ConfigError(f"at_fraction must be in [0, 1], got {self.at_fraction}")
        if isinstance(self.ignored_layers, str):
            self.ignored_layers = (self.ignored_layers,)
        if not all(isinstance(n, str) and n for n in self.ignored_layers):
            raise ConfigError(f"ignored_layers must be a list of layer names, got {self.ignored_layers!r}")
        self.ignored_layers = tuple(self.ignored_layers)
        self.max_removed = _fraction("max_removed", self.max_removed, False, False)
        if not isinstance(self.max_removed_by_layer, dict):
            raise ConfigError(f"max_removed_by_layer must be a mapping of layer name to fraction, "
                              f"got {self.max_removed_by_layer!r}")
        self.max_removed_by_layer = {str(k): _fraction(f"max_removed_by_layer[{k!r}]", v, False, False)
                                     for k, v in self.max_removed_by_layer.items()}

    @property
    def ratio(self) -> Tuple[float, str]:
        """``(fraction kept, "flops" or "channels")``, what :func:`choose_channels` takes."""
        if self.channels_removed is not None:
            return 1.0 - self.channels_removed, "channels"
        if self.keep_ratio is not None:
            return self.keep_ratio, self.target or "flops"
        if self.target is not None:
            return DEFAULT_MACS_KEPT, self.target
        return (self.macs_kept if self.macs_kept is not None else DEFAULT_MACS_KEPT), "flops"


def _matches(layer: str, names: Iterable[str]) -> Optional[str]:
    """The first of ``names`` that is ``layer`` or a module prefix of it (``"layer4"`` matches
    ``"layer4.0.conv1"``), else None."""
    for n in names:
        if layer == n or layer.startswith(n + "."):
            return n
    return None


def check_layer_names(layers, names: Iterable[str], key: str, model: str) -> None:
    """Every name must be a layer or a module prefix of one: else a :class:`ConfigError` naming
    ``key`` and the name."""
    all_names = [l.name for l in layers]
    for n in names:
        if not any(_matches(l, (n,)) for l in all_names):
            raise ConfigError(f"{key}: {n!r} is no layer (or module prefix of a layer) of model {model!r}; "
                              f"layers include {', '.join(all_names[:5])}, ...")


def removal_limits(groups: List[ChannelGroup], ignored: Iterable[str] = (), max_removed: float = 1.0,
                   by_layer: Optional[Dict[str, float]] = None) -> Dict[str, int]:
    """Per prunable group, the fewest channels it may keep: all of them when one of its producers
    or depthwise convs is ignored (an ignored layer keeps its output channels; its input channels
    follow their producers, as in Torch-Pruning), else ``size - floor(fraction * size)`` with the
    smallest fraction of ``max_removed`` and the ``by_layer`` entries matching its producers; at
    least one."""
    ignored, by_layer = tuple(ignored), dict(by_layer or {})
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        owners = g.producers + g.depthwise
        if any(_matches(p, ignored) for p in owners):
            out[g.name] = g.size
            continue
        frac = min([max_removed] + [by_layer[m] for m in (_matches(p, by_layer) for p in owners) if m is not None])
        out[g.name] = max(1, g.size - int(math.floor(frac * g.size + 1e-9)))
    return out


def group_scores(groups: List[ChannelGroup], weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per prunable group, each channel's summed producer-filter L1 norm over the number of
    weights summed (float64): the ``"l1"`` importance of :mod:`prunekit.decisions.channel_importance`."""
    return channel_importance(groups, "l1", weights)


def out_index(g: ChannelGroup, layer: str, channels) -> np.ndarray:
    """The group's channels as indices of ``layer``'s output axis (a group may be a range of it)."""
    return np.asarray(channels, np.int64) + int(getattr(g, "out_offsets", {}).get(layer, 0))


def in_columns(g: ChannelGroup, layer: str, channels) -> np.ndarray:
    """The group's channels as input columns of consumer ``layer`` (its offset in the layer's input;
    ``spatial`` columns per channel after a flatten)."""
    k = np.asarray(channels, np.int64) + int(getattr(g, "in_offsets", {}).get(layer, 0))
    sp = int(g.spatial.get(layer, 1))
    return (k[:, None] * sp + np.arange(sp)[None, :]).ravel() if sp > 1 else k


def atoms(g: ChannelGroup, scores: np.ndarray) -> List[np.ndarray]:
    """The group's channels in the smallest sets that may leave together, lowest score first:
    single channels; whole blocks of ``whole`` channels (GroupNorm groups), ranked by mean score;
    or, for a group feeding grouped convs in ``balanced`` blocks, the j-th lowest channel of every
    block (so each block keeps as many). Ties go to the lower index."""
    whole, balanced = int(getattr(g, "whole", 1)), int(getattr(g, "balanced", 1))
    if whole > 1:
        blocks = np.arange(g.size).reshape(-1, whole)
        mean = scores[blocks].mean(axis=1)
        return [blocks[i] for i in np.lexsort((np.arange(len(blocks)), mean))]
    if balanced > 1:
        width = g.size // balanced
        per_block = [b * width + np.lexsort((np.arange(width), scores[b * width:(b + 1) * width]))
                     for b in range(balanced)]
        return [np.array([blk[j] for blk in per_block]) for j in range(width)]
    return [np.array([i]) for i in np.lexsort((np.arange(g.size), scores))]


class MacModel:
    """Dense MACs of the model's prunable layers as a function of the kept channels per group
    (what :func:`prunekit.decisions.flops.count_model` measures after compaction). A layer's
    output (input) axis may be made of several groups' ranges (concatenations, splits); a grouped
    conv's MACs are ``out * in / groups``."""

    def __init__(self, layers, groups: List[ChannelGroup]):
        outs: Dict[str, list] = {}
        ins: Dict[str, list] = {}
        for g in groups:
            for p in g.producers + g.depthwise:
                outs.setdefault(p, []).append((g.name, g.size))
            for c in g.consumers:
                ins.setdefault(c, []).append((g.name, g.size, int(g.spatial.get(c, 1))))
        # per layer: (MACs per weight-column unit, out parts, in parts, divisor)
        self.terms = []
        for l in layers:
            unit = l.macs_per_weight * (int(np.prod(l.weight_shape[2:])) if l.kind == "conv" else 1)
            out_parts = list(outs.get(l.name, []))
            rest = l.out_channels - sum(n for _, n in out_parts)
            if rest > 0:
                out_parts.append((None, rest))
            if l.kind == "conv" and l.is_depthwise:
                self.terms.append((unit, out_parts, [(None, 1, 1)], 1))
                continue
            in_parts = list(ins.get(l.name, []))
            width = l.weight_shape[1] * (l.groups if l.kind == "conv" else 1)
            rest = width - sum(n * sp for _, n, sp in in_parts)
            if rest > 0:
                in_parts.append((None, rest, 1))
            self.terms.append((unit, out_parts, in_parts, l.groups if l.kind == "conv" else 1))
        self.by_group: Dict[str, List[int]] = {}
        for i, (_, op, ip, _) in enumerate(self.terms):
            for gname in {p[0] for p in op + ip} - {None}:
                self.by_group.setdefault(gname, []).append(i)

    @staticmethod
    def _term(term, kept) -> int:
        unit, op, ip, div = term
        ko = sum(kept.get(gn, n) if gn else n for gn, n in op)
        ki = sum((kept.get(gn, n) if gn else n) * sp for gn, n, sp in ip)
        return unit * ko * ki // div

    def macs(self, kept: Dict[str, int]) -> int:
        return sum(self._term(t, kept) for t in self.terms)

    def saving(self, group: str, kept: Dict[str, int], count: int = 1) -> int:
        """MACs saved by removing ``count`` more channels of ``group``."""
        fewer = dict(kept)
        fewer[group] = kept[group] - count
        return sum(self._term(self.terms[i], kept) - self._term(self.terms[i], fewer)
                   for i in self.by_group.get(group, ()))


def _uniform_counts(sizes: Dict[str, int], fraction: float, round_to: int,
                    min_keep: Optional[Dict[str, int]] = None, step: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Each group's count at ``fraction`` of its size, rounded up to a multiple of its ``step``
    (``round_to``, or a multiple of it that whole blocks allow), at least one step (or the whole
    group if it is smaller) and at least its ``min_keep``, at most all."""
    out = {}
    for n, size in sizes.items():
        q = (step or {}).get(n, round_to)
        k = q * math.ceil(fraction * size / q - 1e-9)
        k = max(k, min(q, size), (min_keep or {}).get(n, 1))
        k = min(size, q * math.ceil(k / q - 1e-9))
        out[n] = int(k)
    return out


def _goal_name(keep_ratio: float, target: str) -> str:
    return f"macs_kept={keep_ratio:g}" if target == "flops" else f"channels_removed={1.0 - keep_ratio:g}"


def _limits_note(min_keep: Dict[str, int], sizes: Dict[str, int]) -> str:
    held = sum(1 for n, k in min_keep.items() if k > 1)
    return f" (ignored_layers / max_removed hold {held} group(s))" if held else ""


def _units(g: ChannelGroup, scores: np.ndarray, round_to: int) -> List[np.ndarray]:
    """The group's channels in removal units, lowest first: atoms (:func:`atoms`) joined so that
    each unit holds a multiple of ``round_to`` channels, the group's remainder first."""
    parts = atoms(g, scores)
    a = len(parts[0])
    m = (a * round_to // math.gcd(a, round_to)) // a  # atoms per unit
    first = len(parts) % m
    bounds = ([0, first] if first else [0]) + list(range(first + m, len(parts) + 1, m))
    return [np.concatenate(parts[i:j]) for i, j in zip(bounds[:-1], bounds[1:])]


def _choose_uniform(layers, groups, scores, keep_ratio, target, round_to, min_keep) -> Dict[str, np.ndarray]:
    by_name = {g.name: g for g in groups if g.name in scores}
    sizes = {n: g.size for n, g in by_name.items()}
    units = {n: _units(g, scores[n], round_to) for n, g in by_name.items()}
    step = {n: len(u[-1]) for n, u in units.items()}
    model = MacModel(layers, groups)
    total_macs, total = model.macs({}), sum(sizes.values())

    def fits(counts):
        if target == "flops":
            return model.macs(counts) <= keep_ratio * total_macs
        return sum(counts.values()) <= keep_count(total, 1.0 - keep_ratio)

    floor = _uniform_counts(sizes, 0.0, round_to, min_keep, step)
    if not fits(floor):
        what = f"{model.macs(floor) / total_macs:.3f} of the MACs" if target == "flops" else \
            f"{sum(floor.values())} of {total} channels kept"
        raise ModelError(f"{_goal_name(keep_ratio, target)} cannot be reached with allocation=uniform and "
                         f"round_to={round_to}{_limits_note(min_keep, sizes)}: the smallest is {what}")
    # the counts only change where fraction * size crosses a multiple of a step: try those
    fractions = sorted({min(1.0, j * step[n] / s) for n, s in sizes.items() for j in range(1, s // step[n] + 2)}
                       | {1.0})
    best = floor
    for f in fractions:
        counts = _uniform_counts(sizes, f, round_to, min_keep, step)
        if not fits(counts):
            break
        best = counts
    out = {}
    for n, size in sizes.items():  # drop the lowest units until the count is met (a remainder unit first)
        gone, k = [], size
        for u in units[n]:
            if k - len(u) < best[n]:
                break
            gone.append(u)
            k -= len(u)
        out[n] = np.setdiff1d(np.arange(size), np.concatenate(gone) if gone else np.zeros(0, np.int64))
    return out


def choose_channels(layers, groups: List[ChannelGroup], weights: Dict[str, np.ndarray], keep_ratio: float,
                    target: str = "flops", round_to: int = 1, allocation: str = "global",
                    scores: Optional[Dict[str, np.ndarray]] = None,
                    min_keep: Optional[Dict[str, int]] = None) -> Dict[str, np.ndarray]:
    """The kept channel indices per prunable group under the rule in the module docstring.

    With ``round_to`` > 1 every group keeps a multiple of ``round_to`` channels (or all of them,
    or, for a group smaller than ``round_to``, all): channels leave in units of ``round_to`` (the
    group's ``size % round_to`` lowest-scoring first), units ranked by their mean score. A group
    normalised in blocks (GroupNorm) loses whole blocks, a group feeding grouped convs as many
    channels from each block (:func:`atoms`).
    ``allocation="uniform"``: the same fraction of every group (module docstring).
    ``scores``: per group, the channel importances (default: the L1 rule, ``weights``);
    ``min_keep``: per group, the fewest channels it may keep (:func:`removal_limits`)."""
    if scores is None:
        scores = group_scores(groups, weights)
    if not scores:
        raise ModelError("the model has no prunable channel group")
    round_to = int(round_to)
    if round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    min_keep = {g.name: max(1, int((min_keep or {}).get(g.name, 1))) for g in groups if g.name in scores}
    if allocation == "uniform":
        return _choose_uniform(layers, groups, scores, keep_ratio, target, round_to, min_keep)
    by_name = {g.name: g for g in groups if g.name in scores}
    names = list(by_name)
    sizes = {n: g.size for n, g in by_name.items()}
    units = []  # (mean score, group position, first channel, channels)
    for gi, n in enumerate(names):
        for c in _units(by_name[n], scores[n], round_to)[:-1]:  # the best unit stays: >= 1 channel per group
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
        if kept[n] - len(chans) < min_keep[n]:
            continue
        macs -= model.saving(n, kept, len(chans))
        kept[n] -= len(chans)
        removed[n].extend(int(c) for c in chans)
        count += len(chans)
    if (macs > goal) if target == "flops" else (count < to_remove):
        what = f"{macs / model.macs({}):.3f} of the MACs" if target == "flops" else f"{count} of {total} channels removed"
        raise ModelError(f"{_goal_name(keep_ratio, target)} cannot be reached with round_to={round_to}"
                         f"{_limits_note(min_keep, sizes)}: the smallest is {what}")
    return {n: np.setdiff1d(np.arange(sizes[n]), np.asarray(removed[n], np.int64)) for n in names}


def channel_masks(handle, groups: List[ChannelGroup], keep: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Float32 masks (weight shapes) zeroing removed channels' producer rows, depthwise rows and
    consumer columns (of a grouped conv: the column within its group, for that group's rows)."""
    info = {l.name: l for l in handle.layers}
    masks: Dict[str, np.ndarray] = {}

    def get(name):
        if name not in masks:
            masks[name] = np.ones(tuple(info[name].weight_shape), np.float32)
        return masks[name]

    for g in groups:
        if g.name not in keep or len(keep[g.name]) == g.size:
            continue
        gone = np.setdiff1d(np.arange(g.size), keep[g.name])
        for p in g.producers + g.depthwise:
            get(p)[out_index(g, p, gone)] = 0.0
        for c in g.consumers:
            cols = in_columns(g, c, gone)
            l, m = info[c], get(c)
            per_in, per_out = m.shape[1], m.shape[0] // max(1, l.groups if l.kind == "conv" else 1)
            for col in cols:
                b = col // per_in
                m[b * per_out:(b + 1) * per_out, col % per_in] = 0.0
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
        self.taylor: Optional[TaylorAccumulator] = None

    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        c = self.config
        check_layer_names(handle.layers, c.ignored_layers, "ignored_layers", handle.model_name)
        check_layer_names(handle.layers, c.max_removed_by_layer, "max_removed_by_layer", handle.model_name)
        self.groups = find_channel_groups(handle)
        if not any(g.prunable for g in self.groups):
            raise ModelError(f"{handle.model_name!r} has no prunable channel group")
        self.decide_step = int(math.floor(c.at_fraction * max(0, self.total_steps - 1)))
        if c.importance in NEEDS_GRADIENTS:
            self.taylor = TaylorAccumulator(self.ops, sorted({p for g in self.groups if g.prunable
                                                              for p in g.producers}))
        return self

    @property
    def _scores_from_gradients(self) -> bool:
        return self.config.importance in NEEDS_GRADIENTS

    def before_step(self, step: int) -> None:
        # a gradient-based importance decides after the decision step's gradients are seen
        if not self.channel_keep and step >= self.decide_step and not self._scores_from_gradients:
            self.decide()

    def needs_dense_gradients(self, step: int) -> bool:
        return self._scores_from_gradients and not self.channel_keep and step <= self.decide_step

    def observe_gradients(self, step: int, grads) -> None:
        if self.taylor is not None:
            self.taylor.add({n: self.handle.weight(n) for n in self.taylor.layers}, grads)

    def after_step(self, step: int) -> None:
        if not self.channel_keep and step >= self.decide_step and self._scores_from_gradients:
            self.decide()

    def finish(self) -> None:
        if not self.channel_keep:
            self.decide()

    def choose(self) -> Dict[str, np.ndarray]:
        """The kept channels per prunable group from the model's weights now (and the gradients
        observed, for ``taylor``); the model is not changed."""
        c = self.config
        weights = {n: np.asarray(w) for n, w in self.handle.weights_numpy().items()}
        state = self.handle.state_numpy() if c.importance == "bn_scale" else None
        limits = removal_limits(self.groups, c.ignored_layers, c.max_removed, c.max_removed_by_layer)
        held = [g for g in self.groups if g.prunable and limits[g.name] >= g.size]
        scores = channel_importance([g for g in self.groups if g not in held], c.importance, weights, state,
                                    self.taylor.result() if self.taylor is not None else None)
        scores.update({g.name: np.ones(g.size) for g in held})  # kept whole: their score is never read
        keep_ratio, target = c.ratio
        return choose_channels(self.handle.layers, self.groups, weights, keep_ratio, target, c.round_to,
                               c.allocation, scores=scores, min_keep=limits)

    def decide(self) -> None:
        keep = self.choose()
        masks = channel_masks(self.handle, self.groups, keep)
        self.channel_keep = keep
        self.set_masks({n: self.ops.asarray(m, like=self.handle.weight(n)) for n, m in masks.items()})

    def describe(self) -> dict:
        c = self.config
        keep_ratio, target = c.ratio
        what = "group L1 of producer filters / weights summed" if c.importance == "l1" else f"{c.importance} importance"
        return {"keep_ratio": keep_ratio, "target": target,
                ("macs_kept" if target == "flops" else "channels_removed"):
                    keep_ratio if target == "flops" else 1.0 - keep_ratio,
                "importance": c.importance, "ignored_layers": list(c.ignored_layers),
                "max_removed": c.max_removed, "max_removed_by_layer": dict(c.max_removed_by_layer),
                "at_fraction": c.at_fraction, "round_to": c.round_to, "allocation": c.allocation,
                "rule": (f"{what}, global ascending, >= 1 per group" if c.allocation == "global" else
                         f"same fraction of every group (rounded up to round_to), best {c.importance} channels kept")}

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["channel_keep"] = {k: np.asarray(v, np.int64) for k, v in self.channel_keep.items()}
        if self.taylor is not None:
            d["taylor"] = self.taylor.state_dict()
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
        if self.taylor is not None and state.get("taylor") is not None:
            self.taylor.load_state_dict(state["taylor"])
