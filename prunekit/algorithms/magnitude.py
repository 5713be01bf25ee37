"""Gradual magnitude pruning (Zhu & Gupta 2017): the baseline every algorithm is compared with.

Scores are |w| (unstructured) or the per-output-channel L2 norm (``granularity="channel"``).
``scope="global"`` ranks all selected layers together with one threshold; ``scope="layer"``
prunes every layer to the same sparsity. For global channel pruning a channel's score is its
RMS (L2 norm / sqrt(entries per channel)) so that layers of different fan-in compare fairly.
Masks are recomputed on the schedule's update steps; between updates they are re-applied to
gradients and weights every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Sequence

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.decisions.schedules import SparsitySchedule
from prunekit.decisions.selection import (
    channel_scores, check_sparsity, expand_channel_mask, global_topk_masks, keep_count, topk_mask
)
from prunekit.errors import ConfigError

GRANULARITIES = ("unstructured", "channel")
SCOPES = ("global", "layer")


@dataclass
class MagnitudeConfig:
    sparsity: float = 0.9
    granularity: str = "unstructured"
    scope: str = "global"
    schedule: str = "cubic"
    begin_fraction: float = 0.0     # of total steps
    end_fraction: float = 0.75      # of total steps
    frequency: int = 100            # steps between mask updates
    exclude: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        self.sparsity = check_sparsity(self.sparsity)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if not (0.0 <= self.begin_fraction <= self.end_fraction <= 1.0):
            raise ConfigError("need 0 <= begin_fraction <= end_fraction <= 1, got "
                              f"{self.begin_fraction}, {self.end_fraction}")


@register_algorithm
class MagnitudePruner(Algorithm):
    name = "magnitude"
    config_class = MagnitudeConfig

    def __init__(self, config: MagnitudeConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or MagnitudeConfig(**kwargs)
        self.schedule: SparsitySchedule | None = None
        self.current_sparsity = 0.0

    def select_layers(self, layers):
        excluded = set(self.config.exclude)
        unknown = excluded - {l.name for l in layers}
        if unknown:
            raise ConfigError(f"exclude names unknown layer(s): {sorted(unknown)}")
        return [l for l in layers if l.name not in excluded]

    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        c = self.config
        last = max(0, self.total_steps - 1)
        begin = int(math.floor(c.begin_fraction * last))
        end = max(begin, int(math.floor(c.end_fraction * last)))
        self.schedule = SparsitySchedule(c.sparsity, begin, end, c.frequency, c.schedule)
        return self

    def before_step(self, step: int) -> None:
        if self.schedule.is_update_step(step):
            self.update_masks(self.schedule.sparsity_at(step))

    def finish(self) -> None:
        # the schedule may end between update steps: make sure the final target holds
        if abs(self.current_sparsity - self.config.sparsity) > 1e-12:
            self.update_masks(self.config.sparsity)

    # ------------------------------------------------------------------ decisions
    def update_masks(self, sparsity: float) -> None:
        self.set_masks(magnitude_masks(self.handle, self.layers, sparsity, self.config.granularity, self.config.scope))
        self.current_sparsity = sparsity

    @property
    def target_sparsity(self) -> float:
        return self.config.sparsity

    def describe(self) -> dict:
        c = self.config
        return {"target_sparsity": c.sparsity, "granularity": c.granularity, "scope": c.scope,
                "schedule": c.schedule}

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["current_sparsity"] = float(self.current_sparsity)
        return d

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.current_sparsity = float(state.get("current_sparsity", 0.0))


def magnitude_masks(handle, layers, sparsity: float, granularity: str = "unstructured",
                    scope: str = "global") -> Dict[str, object]:
    """Masks keeping the largest-magnitude weights (or channels) at ``sparsity``."""
    ops = handle.ops
    weights = {l.name: handle.weight(l.name) for l in layers}
    if granularity == "unstructured":
        scores = {n: ops.abs(w) for n, w in weights.items()}
        if scope == "global":
            total = sum(ops.size(s) for s in scores.values())
            return global_topk_masks(ops, scores, keep_count(total, sparsity))
        return {n: topk_mask(ops, s, keep_count(ops.size(s), sparsity)) for n, s in scores.items()}
    # channel granularity: at least one channel is always kept per layer
    ch = {}
    for l in layers:
        s = channel_scores(ops, weights[l.name], "l2")
        if scope == "global":
            s = s * (1.0 / math.sqrt(max(1, l.numel // l.weight_shape[0])))
        ch[l.name] = s
    if scope == "global":
        total = sum(ops.size(s) for s in ch.values())
        cmasks = global_topk_masks(ops, ch, keep_count(total, sparsity))
        for l in layers:  # never empty a layer: keep its best channel
            if ops.item(ops.sum(cmasks[l.name])) < 0.5:
                cmasks[l.name] = topk_mask(ops, ch[l.name], 1)
    else:
        cmasks = {n: topk_mask(ops, s, max(1, keep_count(ops.size(s), sparsity))) for n, s in ch.items()}
    return {l.name: expand_channel_mask(ops, cmasks[l.name], l.weight_shape) for l in layers}
