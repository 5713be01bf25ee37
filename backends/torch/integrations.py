"""Prune inside PyTorch Lightning: the framework integrations of a
:class:`~prunekit.backends.torch.driver.PruningSession` (the MindSpore twin,
``backends/mindspore/integrations.py``, holds ``Model.train``'s callback and train cell).

A ``lightning.pytorch.Callback`` drives the session (any prunekit algorithm) from Lightning's hooks::

    callback = PruningCallback(make_algorithm("magnitude", sparsity=0.9), module="net")
    lightning.Trainer(max_steps=1000, callbacks=[callback]).fit(lit_module, loader)
    callback.handle      # the pruned network's ModelHandle (reports, plans, exports)

Lightning 2.x, automatic optimization, calls for each batch: ``on_train_batch_start``, then
``optimizer_step`` of the LightningModule, whose ``optimizer.step(closure)`` runs the closure
(``training_step``, ``zero_grad``, ``backward`` with ``on_after_backward``), then
``on_before_optimizer_step`` (gradients unscaled by mixed precision, not clipped yet), gradient
clipping, the torch optimizer's update; then ``on_train_batch_end``. The session's calls map onto
them as follows:

=================================  ======================================================
``on_train_start``                 build the handle over the network, bind the algorithm
                                   (``total_steps``: ``trainer.estimated_stepping_batches``
                                   unless given)
``on_train_batch_start``           ``session.before_step()`` (schedules may change masks)
``on_before_optimizer_step``       ``session.after_backward()``: masks and regulariser terms
                                   on the gradients, after AMP unscaling and before clipping,
                                   as in a plain loop
``optimizer_step`` (wrapped)       skips the update where ``session.should_step()`` is False
``on_train_batch_end``             ``session.after_optimizer_step()`` (masks re-applied,
                                   projections)
``on_train_end``                   ``session.finish()`` (``finish_on_end=True``)
=================================  ======================================================

Skipping an optimizer step (RPG's ``semantics="release"`` skips the step before each mask
update) has no callback hook: ``on_train_start`` wraps the module's ``optimizer_step`` (an
instance attribute; ``on_train_end`` removes it). Where the algorithm skips, the wrapper runs the
closure itself (forward and backward still happen, and the algorithm still sees that step's
gradients through ``session.after_backward()``, called by the wrapper since
``on_before_optimizer_step`` is not) but does not call ``optimizer.step``. Lightning counts the
step all the same (its step counter advances in the loop around ``optimizer_step``), as the
plain loop's session does. On such a skipped step the gradients are not unscaled by mixed
precision; masks are unaffected, gradient scores (RPG's regrowth) are scaled by the loss scale.

Not supported, with a clear error: manual optimization (call the session yourself),
several optimizers, ``accumulate_grad_batches != 1`` (one session step per optimizer step).
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl
import torch.nn as nn

from prunekit.algorithms.base import Algorithm
from prunekit.errors import ConfigError

from .driver import PruningSession
from .layers import TorchModelHandle


class PruningCallback(pl.Callback):
    """Runs ``algorithm`` on the network ``module`` of the LightningModule being fitted.

    ``module``: attribute path of the network inside the LightningModule (``"net"``,
    ``"model.backbone"``), so that layer names are the network's own (``conv1``, as in plans and
    on the MindSpore twin); None prunes the LightningModule itself. ``input_shape``: one
    sample's shape, for the probe pass that finds the layers (default: from the module's
    ``example_input_array``). ``total_steps``: the algorithm's horizon (default: Lightning's
    ``estimated_stepping_batches``). ``finish_on_end=False`` when one pruning run spans several
    ``fit`` calls; then call ``callback.session.finish()`` after the last.
    """

    def __init__(self, algorithm: Algorithm, module: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                 total_steps: Optional[int] = None, model_name: str = "model", finish_on_end: bool = True):
        super().__init__()
        if not isinstance(algorithm, Algorithm):
            raise ConfigError(f"PruningCallback needs a prunekit algorithm, got {type(algorithm).__name__}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.algorithm = algorithm
        self.module_path = module
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.total_steps = total_steps
        self.model_name = model_name
        self.finish_on_end = finish_on_end
        self.handle: Optional[TorchModelHandle] = None
        self.session: Optional[PruningSession] = None
        self._wrapped = None

    # ------------------------------------------------------------------ setup
    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if not self.module_path:
            return pl_module
        try:
            net = pl_module.get_submodule(self.module_path)
        except AttributeError:
            raise ConfigError(f"the LightningModule has no submodule {self.module_path!r}") from None
        return net

    def _input_shape(self, pl_module: pl.LightningModule) -> tuple:
        if self.input_shape is not None:
            return self.input_shape
        example = getattr(pl_module, "example_input_array", None)
        if example is None or not hasattr(example, "shape"):
            raise ConfigError("PruningCallback needs input_shape (one sample's shape, e.g. (3, 32, 32)) or the "
                              "LightningModule's example_input_array")
        return tuple(example.shape[1:])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError("PruningCallback drives automatic optimization; with manual optimization call a "
                              "prunekit.backends.torch.PruningSession's methods in training_step instead")
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"PruningCallback needs exactly one optimizer, the module has {len(trainer.optimizers)}")
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError("PruningCallback needs accumulate_grad_batches=1 (one pruning step per optimizer step), "
                              f"got {trainer.accumulate_grad_batches}")
        if self.session is None:  # a second fit() continues the same session
            total = self.total_steps or trainer.estimated_stepping_batches
            if not (1 <= total < float("inf")):
                raise ConfigError("PruningCallback could not tell the number of training steps; pass total_steps")
            total = int(total)
            self.handle = TorchModelHandle(self._network(pl_module), self._input_shape(pl_module), self.model_name)
            self.session = PruningSession(self.handle, self.algorithm, trainer.optimizers[0], total)
        else:
            self.session.optimizer = trainer.optimizers[0]
        self._wrap_optimizer_step(pl_module)

    def _wrap_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.optimizer_step
        session = self.session

        def optimizer_step(epoch, batch_idx, optimizer, optimizer_closure=None):
            if session.should_step():
                return original(epoch, batch_idx, optimizer, optimizer_closure)
            if optimizer_closure is not None:
                optimizer_closure()  # training_step, zero_grad, backward: Lightning requires it to run
            session.after_backward()  # on_before_optimizer_step is not called without optimizer.step
            return None

        pl_module.optimizer_step = optimizer_step
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("optimizer_step", None)
            self._wrapped = None

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.session.before_step()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.session.after_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.session.after_optimizer_step()

    def on_train_end(self, trainer, pl_module) -> None:
        self._unwrap()
        if self.finish_on_end:
            self.session.finish()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._unwrap()
