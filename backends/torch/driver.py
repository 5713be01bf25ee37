"""Training-loop integration for PyTorch.

:class:`PruningSession` fits around *any* optimizer in a plain loop::

    session = PruningSession(handle, algorithm, optimizer, total_steps)
    for x, y in loader:
        session.before_step()                      # schedules may update masks here
        loss = criterion(model(x), y)
        optimizer.zero_grad(); loss.backward()
        session.after_backward()                   # masks / regulariser terms on .grad
        if session.should_step():                  # False only where an algorithm skips a step
            optimizer.step()
        session.after_optimizer_step()             # re-apply masks, projections
    session.finish()

Everything stays on the model's device; nothing is copied to the host inside a step. The step
counter lives in the session (``session.step``) and the algorithm's state is in
``session.state_dict()``, so checkpoints and data-parallel wrappers can be added around it.
:class:`Trainer` is the loop prunekit's own job uses, built on the same session. The life cycle
itself is :class:`prunekit.app.session.SessionBase`'s; PyTorch Lightning's callback is in
:mod:`.integrations`.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.algorithms.base import Algorithm
from prunekit.app.session import SessionBase
from prunekit.decisions.schedules import LearningRateSchedule

from .fused import add_terms_, mul_all_
from .layers import TorchModelHandle
from .optimizers import make_optimizer


class PruningSession(SessionBase):
    """The session life cycle of :class:`prunekit.app.session.SessionBase` on ``.grad`` and the
    optimizer's state dict, with the multi-tensor ops of :mod:`.fused`."""

    adds_terms = True

    def after_backward(self) -> None:
        """Masks and the algorithm's gradient terms on ``.grad``, in place."""
        if self.algorithm is None:
            return
        grads = {n: p.grad for n, p in self._weights.items() if p.grad is not None}
        for n, g in self._transform(grads).items():
            if g is not grads.get(n):
                self._weights[n].grad.copy_(g)

    def _dense_copy(self, grads):
        return {n: g.detach().clone() for n, g in grads.items()}

    def _mask_gradients(self, grads, masks):
        names = [n for n in masks if n in grads]
        mul_all_([grads[n] for n in names], [masks[n] for n in names])
        return grads

    def _add_terms(self, grads, terms):
        add_terms_(grads, terms, self.algorithm.masks)
        return grads

    def _mask_weights(self, weights, masks) -> None:
        mul_all_(weights, masks)

    def _mask_optimizer_state(self, layer, mask) -> None:
        p = self._weights[layer]
        for value in self.optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.mul_(mask)


class Trainer:
    """Cross-entropy training of a model with an optional pruning algorithm, fed NumPy batches."""

    session_class = PruningSession  # the data-parallel trainer substitutes its own

    def __init__(self, handle: TorchModelHandle, algorithm: Optional[Algorithm] = None, optimizer: str = "sgd",
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, total_steps: int = 1,
                 lr_schedule: str = "cosine", milestones: tuple = (), device: Optional[str] = None):
        self.handle = handle
        self.model = handle.model
        self.device = torch.device(device) if device else next(self.model.parameters()).device
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, optimizer, lr, momentum, weight_decay)
        self.lr = LearningRateSchedule(lr, total_steps, lr_schedule, tuple(milestones))
        self.session = self.session_class(handle, algorithm, self.optimizer, total_steps)

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True),
                torch.from_numpy(np.ascontiguousarray(y)).to(self.device, non_blocking=True))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """One optimizer step; returns the loss as a 0-d tensor (no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr.lr_at(self.session.step)
        self.model.train()
        xb, yb = self._to_device(x, y)
        self.session.before_step()
        logits = self.model(xb)
        loss = F.cross_entropy(logits, yb)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.session.after_backward()
        if self.session.should_step():
            self.optimizer.step()
        self.session.finite.note_loss(loss.detach())  # checked with the weights at the step's end
        self.session.after_optimizer_step()
        #: correct predictions in the batch just trained on, a 0-d tensor (no host sync)
        self.last_correct = (logits.detach().argmax(1) == yb).sum()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float]:
        """Mean loss and accuracy over NumPy batches, in eval mode."""
        self.model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in batches:
            xb, yb = self._to_device(x, y)
            logits = self.model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            total += int(yb.shape[0])
        return loss_sum / max(1, total), correct / max(1, total)

    def finish(self) -> None:
        self.session.finish()
