"""What the neutral core needs from a backend's model: the :class:`ModelHandle` contract.

Each backend implements it in ``backends/<name>/layers.py``. Names are the shared parameter
names (PyTorch's dotted paths, e.g. ``layer1.0.conv1.weight``); BatchNorm entries use
``weight``, ``bias``, ``running_mean``, ``running_var`` on both backends. The members below are
everything the core uses of a handle.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, List, Tuple

import numpy as np

from prunekit.contract.layers import LayerInfo
from prunekit.contract.ops import Ops, Tensor


class ModelHandle(abc.ABC):
    #: registered name of the backend the handle belongs to (:func:`prunekit.contract.backend.backend_of`)
    backend: str
    #: the tensor API on the model's tensors and device
    ops: Ops
    #: the prunable conv/linear layers, in model order
    layers: List[LayerInfo]
    #: reference model name (or the name given to ``Backend.wrap``), for messages and plans
    model_name: str
    #: (channels, height, width) of one input image
    input_shape: Tuple[int, ...]
    #: the framework's model object (a module or cell); the core never looks inside it
    model: Any

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

    def parameters_by_name(self) -> Dict[str, Any]:
        """The model's trainable parameters (framework objects) by shared name."""
        raise NotImplementedError(f"{type(self).__name__} does not list its parameters")

    def module(self, layer: str) -> Any:
        """The framework module (or cell) of a prunable layer, by name."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its layers' modules")

    def initialize(self, seed: int) -> None:
        """Load the shared seeded initialisation (identical on every backend for a seed)."""
        raise NotImplementedError(f"{type(self).__name__} has no shared initialisation")

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def weights_numpy(self) -> Dict[str, np.ndarray]:
        return {l.name: self.ops.to_numpy(self.weight(l.name)) for l in self.layers}
