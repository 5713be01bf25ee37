"""What the neutral core needs from a backend's model: the :class:`ModelHandle` contract.

Each backend implements it in ``backends/<name>/layers.py``. Names are the shared parameter
names (PyTorch's dotted paths, e.g. ``layer1.0.conv1.weight``); BatchNorm entries use
``weight``, ``bias``, ``running_mean``, ``running_var`` on both backends.
"""
from __future__ import annotations

import abc
from typing import Dict, List

import numpy as np

from prunekit.contract.layers import LayerInfo
from prunekit.contract.ops import Ops, Tensor


class ModelHandle(abc.ABC):
    ops: Ops
    layers: List[LayerInfo]
    model_name: str

    @abc.abstractmethod
    def weight(self, layer: str) -> Tensor:
        """The current weight tensor of a prunable layer (shared layout, on the model's device)."""

    @abc.abstractmethod
    def set_weight(self, layer: str, value: Tensor) -> None:
        """Overwrite the weight of a prunable layer in place (no new Parameter)."""

    def set_weights(self, values: Dict[str, Tensor]) -> None:
        """Overwrite several prunable weights (``{layer: value}``); a backend may do it in one call."""
        for layer, value in values.items():
            self.set_weight(layer, value)

    @abc.abstractmethod
    def mul_weight_(self, layer: str, mask: Tensor) -> None:
        """Multiply the weight of a prunable layer by ``mask`` in place."""

    @abc.abstractmethod
    def state_numpy(self) -> Dict[str, np.ndarray]:
        """All parameters and BN statistics as NumPy arrays under the shared names."""

    @abc.abstractmethod
    def load_state_numpy(self, state: Dict[str, np.ndarray], strict: bool = True) -> None:
        """Load arrays by shared name; with ``strict`` every name and shape must match."""

    @abc.abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Eval-mode outputs (logits) for a float32 NCHW NumPy batch, as NumPy."""

    def forward(self, x: Tensor) -> Tensor:
        """The model's outputs for a framework batch tensor, differentiable with respect to the
        parameters (call it inside :meth:`Ops.value_and_grad`). The mode is left as it is: see
        :meth:`set_training`."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable forward")

    def set_training(self, training: bool) -> bool:
        """Put the model in train (BN batch statistics) or eval mode; returns the previous mode."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch train/eval mode")

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def weights_numpy(self) -> Dict[str, np.ndarray]:
        return {l.name: self.ops.to_numpy(self.weight(l.name)) for l in self.layers}
