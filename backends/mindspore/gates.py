"""Channel gates for DSA on MindSpore (PyNative): per-group gate values multiplied onto BN outputs.

Each gated BatchNorm cell is switched to a subclass of its own class whose ``construct`` returns
``BN(x) * gate`` (the instance's ``__class__`` is swapped; its path, parameters and names stay
as they are), so the gate acts after BN and before the following ReLU or residual add. A BN has
one gate vector, assembled from the slices of every gated group it normalises, each at its offset
(a BN over a concatenation holds several groups: ``NormGateLayout`` in
``prunekit.decisions.channel_groups``); a group's gradient is the sum of its slices' gradients
over its BNs. :meth:`ChannelGates.remove` switches the classes back.
Gates are ``Parameter``\\ s set on the cells with ``object.__setattr__`` (not registered as the
cells' parameters), so ``model.trainable_params()`` (the optimizer's list), checkpoints and the
handle's state never contain them. Their gradient comes from ``mindspore.value_and_grad`` with
respect to the gates alone.

Quirks (MindSpore 2.10, CPU): a forward hook (``register_forward_hook``) would be simpler, but
inside a ``mindspore.jit``-compiled forward pass (the Trainer's) hooks on the direct children of
a ``SequentialCell`` (VGG's BNs) are silently skipped, while the subclass's ``construct`` is
compiled like any other. A compiled graph reads the gates at run time only if they are written
in place with ``Tensor.copy_`` (``layers.write_``); after ``Parameter.set_data`` it keeps the old
values.
"""
from __future__ import annotations

import logging
from typing import Dict, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.decisions.channel_groups import NormGateLayout
from prunekit.errors import ModelError

from .layers import _BN, write_

log = logging.getLogger(__name__)


class ChannelGates:
    """``groups``: ``{group name: (BN cell names, channels)}`` or ``(BN cell names, channels, {BN: offset})``.
    ``jit``: compile the gate-gradient pass."""

    def __init__(self, handle, groups: Dict[str, Tuple], jit: bool = True):
        self.handle = handle
        self.model = handle.model
        cells = dict(self.model.cells_and_names())
        channels = {}
        for name, spec in groups.items():
            for bn in spec[0]:
                cell = cells.get(bn)
                if cell is None:
                    raise ModelError(f"channel group {name!r} names BatchNorm {bn!r}, which the model does not have")
                if not isinstance(cell, _BN):
                    raise ModelError(f"channel group {name!r}: {bn!r} is a {type(cell).__name__}, not a BatchNorm")
                channels[bn] = int(cell.gamma.shape[0])
        self.layout = NormGateLayout(groups, channels)
        self._values = {name: np.ones(int(spec[1]), np.float32) for name, spec in groups.items()}
        #: one gate per gated BN
        self.gates: Dict[str, ms.Parameter] = {}
        self._cells = []
        for bn, n in self.layout.channels.items():
            gate = ms.Parameter(ms.Tensor(np.ones(n, np.float32)), name=f"dsa_gate.{bn}", requires_grad=True)
            self.gates[bn] = gate
            cell = cells[bn]
            self._cells.append((cell, type(cell)))
            object.__setattr__(cell, "dsa_gate", gate)
            cell.__class__ = _gated_class(type(cell))
        self._names = list(self.gates)
        model = self.model

        def loss_fn(x, y):
            return msops.cross_entropy(model(x), y)

        grad_fn = ms.value_and_grad(loss_fn, None, ms.ParameterTuple([self.gates[n] for n in self._names]))
        self._eager = grad_fn
        self._grad = ms.jit(grad_fn) if jit else grad_fn

    def set(self, values: Dict[str, np.ndarray]) -> None:
        """Write gate values (one float per channel) by group name, in place."""
        for name, v in values.items():
            self._values[name] = np.asarray(v, np.float32).ravel().copy()
        current = {bn: g.asnumpy() for bn, g in self.gates.items()}
        for bn, vec in self.layout.assemble(values, current).items():
            write_(self.gates[bn], ms.Tensor(np.ascontiguousarray(vec, dtype=np.float32)))

    def values(self) -> Dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._values.items()}

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """Cross-entropy on one batch in training mode; ``(loss, ∂L/∂gate per group)``. Only the
        gates get gradients; BN running statistics update as in any training forward pass; the
        model is left in the mode it was in."""
        xb = ms.Tensor(np.ascontiguousarray(x, dtype=np.float32))
        yb = ms.Tensor(np.ascontiguousarray(y).astype(np.int32))
        was_training = self.model.training
        if not was_training:
            self.model.set_train(True)
        try:
            loss, grads = self._grad(xb, yb)
        except (RuntimeError, TypeError, ValueError) as e:
            if self._grad is self._eager:
                raise
            log.warning("mindspore.jit failed on the gate-gradient pass (%s); running PyNative", e)
            self._grad = self._eager
            loss, grads = self._grad(xb, yb)
        finally:
            if not was_training:  # the caller's mode, as it was
                self.model.set_train(False)
        return float(loss.asnumpy()), self.layout.split({n: g.asnumpy() for n, g in zip(self._names, grads)})

    def remove(self) -> None:
        """Switch the BN cells back to their own class (the model computes without gates again)."""
        for cell, cls in self._cells:
            cell.__class__ = cls
            object.__delattr__(cell, "dsa_gate")
        self._cells = []


_GATED: Dict[type, type] = {}


def _gated_class(base: type) -> type:
    """The subclass of BN class ``base`` that multiplies its output by ``self.dsa_gate``, one per base."""
    if base in _GATED:
        return _GATED[base]
    if issubclass(base, tuple(_GATED.values())):
        raise ModelError(f"{base.__name__} is gated already (two DSA gate sets on one model?)")
    shape = (1, -1, 1, 1) if issubclass(base, nn.BatchNorm2d) else (1, -1)

    class Gated(base):
        _dsa_shape = shape

        def construct(self, x):
            return super().construct(x) * self.dsa_gate.reshape(self._dsa_shape)

    Gated.__name__ = Gated.__qualname__ = f"Gated{base.__name__}"
    _GATED[base] = Gated
    return Gated
