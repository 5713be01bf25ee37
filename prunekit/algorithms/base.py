"""The contract between an algorithm and a backend's training driver.

A driver calls, for every optimizer step ``t`` (0-based, counted over the whole run):

1. ``before_step(t)``: the algorithm may recompute masks (schedules) and apply them to the
   weights. If it changed any mask it sets ``masks_changed``; the driver then masks the
   optimizer's state (momentum, Adam moments) with the new masks and clears the flag.
2. forward and backward; if ``needs_dense_gradients(t)``, the driver first passes the
   unmasked gradients to ``observe_gradients(t, grads)``; then it multiplies the gradients of masked weights by their
   masks (in place, with the framework's fused ops: masking is the driver's hot path).
3. ``transform_gradients(t, grads)``: the algorithm's own gradient terms (regularisers), on
   the gradients of the prunable weights by layer name; returns the dict (may modify it).
4. the framework's optimizer steps, unless ``should_step_optimizer(t)`` is False.
5. the driver multiplies the masked weights by their masks again, so pruned weights stay
   exactly zero whatever weight decay and momentum do; then ``after_step(t)`` for the
   algorithm's own post-step work (projections, thresholds).

The algorithm only sees :class:`~prunekit.ops.Ops` and :class:`~prunekit.handle.ModelHandle`.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ..errors import ModelError
from ..handle import ModelHandle
from ..layers import require_prunable, signature
from ..ops import Tensor
from ..plan import PruningPlan


class Algorithm:
    name = "base"

    def __init__(self):
        self.handle: Optional[ModelHandle] = None
        self.ops = None
        self.layers = []
        self.total_steps = 0
        self.masks: Dict[str, Tensor] = {}
        self.masks_changed = False
        #: what the driver multiplies the optimizer state by on a mask change (None: the masks)
        self.state_masks: Optional[Dict[str, Tensor]] = None

    # ------------------------------------------------------------------ lifecycle
    def bind(self, handle: ModelHandle, total_steps: int) -> "Algorithm":
        self.handle = handle
        self.ops = handle.ops
        self.layers = require_prunable(self.select_layers(handle.layers), handle.model_name)
        self.total_steps = int(total_steps)
        check_finite_weights(handle, self.layers)
        return self

    def select_layers(self, layers):
        """The layers this algorithm prunes (default: every prunable layer)."""
        return list(layers)

    def before_step(self, step: int) -> None:
        pass

    def needs_dense_gradients(self, step: int) -> bool:
        """True if the driver should call :meth:`observe_gradients` at this step."""
        return False

    def observe_gradients(self, step: int, grads: Dict[str, Tensor]) -> None:
        """The unmasked gradients of the prunable weights (e.g. RigL regrowth scores)."""

    def should_step_optimizer(self, step: int) -> bool:
        """False where the algorithm wants this step's optimizer update skipped."""
        return True

    def transform_gradients(self, step: int, grads: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return grads

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        """Called once after the last step (final decisions, e.g. hard masks)."""

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: Dict[str, Tensor], state_masks: Optional[Dict[str, Tensor]] = None) -> None:
        """New masks, applied to the weights now. ``state_masks`` (default: the masks) is what the
        driver multiplies the optimizer state by, e.g. to also clear the momentum of regrown weights."""
        self.masks = dict(masks)
        self.state_masks = dict(state_masks) if state_masks is not None else None
        self.masks_changed = True
        self.apply_masks()

    def optimizer_state_masks(self) -> Dict[str, Tensor]:
        return self.state_masks if self.state_masks is not None else self.masks

    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.handle.mul_weight_(name, mask)

    # ------------------------------------------------------------------ output
    def plan(self) -> PruningPlan:
        return PruningPlan(
            model=self.handle.model_name,
            algorithm=self.name,
            backend=self.ops.name,
            layer_signature=signature(self.handle.layers),
            masks={n: self.ops.to_numpy(m) > 0.5 for n, m in self.masks.items()},
            meta=self.describe(),
        )

    def describe(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Pruning state for checkpoints (masks as NumPy)."""
        return {"masks": {n: self.ops.to_numpy(m) for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        like = self.handle.weight(self.layers[0].name)
        self.set_masks({n: self.ops.asarray(np.asarray(m, dtype=np.float32), like=like) for n, m in state["masks"].items()})


def check_finite_weights(handle: ModelHandle, layers) -> None:
    """Refuse to prune a model whose prunable weights hold NaN or Inf."""
    ops = handle.ops
    for layer in layers:
        w = handle.weight(layer.name)
        bad = ops.size(w) - int(round(ops.item(ops.sum(ops.cast(ops.isfinite(w), "float32")))))
        if bad:
            raise ModelError(f"layer {layer.name!r} has {bad} NaN or Inf weight value(s); refusing to prune")


def apply_plan(handle: ModelHandle, plan: PruningPlan) -> Dict[str, Tensor]:
    """Replay a plan's masks onto a model (checked first; nothing changes on a mismatch)."""
    plan.check_matches(handle.layers, handle.model_name)
    check_finite_weights(handle, handle.layers)
    ops = handle.ops
    masks = {}
    for name, m in plan.masks.items():
        masks[name] = ops.asarray(m.astype(np.float32), like=handle.weight(name))
    for name, m in masks.items():
        handle.mul_weight_(name, m)
    return masks
