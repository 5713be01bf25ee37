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
:class:`Trainer` is the loop prunekit's own job uses, built on the same session.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.algorithms.base import Algorithm
from prunekit.errors import ConfigError
from prunekit.decisions.schedules import LearningRateSchedule

from .layers import TorchModelHandle

OPTIMIZERS = ("sgd", "adam")


class PruningSession:
    def __init__(self, handle: TorchModelHandle, algorithm: Optional[Algorithm], optimizer: torch.optim.Optimizer,
                 total_steps: int):
        self.handle = handle
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.step = 0
        self._weights = {l.name: handle.module(l.name).weight for l in handle.layers}
        self._masks_seen = None  # the algorithm's masks dict the lists below were built from
        self._masked_weights, self._mask_list = [], []
        if algorithm is not None:
            algorithm.bind(handle, total_steps)

    def _mask_lists(self):
        masks = self.algorithm.masks
        if masks is not self._masks_seen:
            self._masked_weights = [self._weights[n] for n in masks]
            self._mask_list = list(masks.values())
            self._masks_seen = masks
        return self._masked_weights, self._mask_list

    def before_step(self) -> None:
        if self.algorithm is None:
            return
        self.algorithm.before_step(self.step)
        self._sync_optimizer_state()

    def after_backward(self) -> None:
        if self.algorithm is None:
            return
        if self.algorithm.needs_dense_gradients(self.step):
            self.algorithm.observe_gradients(self.step, {n: p.grad.detach().clone() for n, p in self._weights.items()
                                                         if p.grad is not None})
        weights, masks = self._mask_lists()
        pairs = [(w.grad, m) for w, m in zip(weights, masks) if w.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])
        # an algorithm whose transform only adds (masked) terms hands them over and they go onto
        # .grad in place, all layers in one multi-tensor op (``Algorithm.gradient_terms``) instead
        # of a mask product, a sum and a copy per layer; a transform replaced on the instance
        # (e.g. a test spy) keeps the generic path
        if "transform_gradients" not in vars(self.algorithm):
            terms = self.algorithm.gradient_terms(self.step)
            if terms is not None:
                self._add_terms(terms)
                return
        grads = {n: p.grad for n, p in self._weights.items() if p.grad is not None}
        new = self.algorithm.transform_gradients(self.step, dict(grads))
        for n, g in new.items():
            if g is not grads.get(n):
                self._weights[n].grad.copy_(g)

    def _add_terms(self, terms) -> None:
        """``grad += term·mask`` (``grad += term`` for an unmasked layer); the gradients are
        already masked, so this is the generic path's ``(g + term)·mask``, bit for bit."""
        masks = self.algorithm.masks
        grads = {n: self._weights[n].grad for n in terms if n in self._weights and self._weights[n].grad is not None}
        masked = [n for n in grads if n in masks]
        plain = [n for n in grads if n not in masks]
        with torch.no_grad():
            if masked:
                torch._foreach_addcmul_([grads[n] for n in masked], [terms[n] for n in masked],
                                        [masks[n] for n in masked])
            if plain:
                torch._foreach_add_([grads[n] for n in plain], [terms[n] for n in plain])

    def should_step(self) -> bool:
        """Whether to call ``optimizer.step()`` this step (RPG's release semantics skips some)."""
        return self.algorithm is None or self.algorithm.should_step_optimizer(self.step)

    def after_optimizer_step(self) -> None:
        if self.algorithm is not None:
            weights, masks = self._mask_lists()
            if weights:
                with torch.no_grad():
                    torch._foreach_mul_(weights, masks)
            self.algorithm.after_step(self.step)
            self._sync_optimizer_state()
        self.step += 1

    def finish(self) -> None:
        if self.algorithm is not None:
            self.algorithm.finish()
            self._sync_optimizer_state()

    def _sync_optimizer_state(self) -> None:
        """After a mask change, zero momentum / Adam moments of pruned weights."""
        if not self.algorithm.masks_changed:
            return
        for name, mask in self.algorithm.optimizer_state_masks().items():
            p = self._weights[name]
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(mask)
        self.algorithm.masks_changed = False

    def state_dict(self) -> dict:
        return {"step": self.step, "algorithm": self.algorithm.state_dict() if self.algorithm else None}


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 5e-4, nesterov: bool = False) -> torch.optim.Optimizer:
    key = str(name).lower()
    if key == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if key == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


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
