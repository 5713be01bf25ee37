"""Prunable-layer discovery and the :class:`~prunekit.contract.handle.ModelHandle` for PyTorch models.

Any ``nn.Conv2d`` (grouped and depthwise included) or ``nn.Linear`` is prunable. Spatial sizes
for FLOPs come from one probe forward pass with hooks, in eval mode, on the model's device and
in its floating dtype (float16 and bfloat16 models included).

A model wrapped by ``torch.compile`` is handled through the module it wraps (``_orig_mod``): names
carry no ``_orig_mod.`` prefix, so plans and states move between the compiled model and its
original, and the compiled module (``handle.compiled``) shares the same parameters.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.errors import ModelError, PlanError
from prunekit.contract.handle import ModelHandle
from prunekit.contract.layers import LayerInfo, require_prunable
from prunekit.contract.reference_models import init_state

from .ops import TorchOps

PRUNABLE = (nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
#: norm layers channel groups slice with their channels (LayerNorm and GroupNorm only where exact)
NORMS = _BN + (nn.GroupNorm, nn.LayerNorm)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``), or ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _hw(t: torch.Tensor):
    return (int(t.shape[-2]), int(t.shape[-1])) if t.dim() == 4 else (1, 1)


@contextmanager
def probe_mode(model: nn.Module):
    """Eval mode without gradients for a probe pass; the train flag is restored after."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def probe_forward(model, x):
    """The model's output on ``x`` in :func:`probe_mode`."""
    with probe_mode(model):
        return model(x)


def discover_layers(model: nn.Module, input_shape: Sequence[int]) -> List[LayerInfo]:
    """Every Conv2d/Linear in definition order, with spatial sizes from a probe forward pass."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    seen: Dict[str, tuple] = {}

    def recorder(name):
        def hook(module, inputs, output):  # must return None, or it would replace the output
            seen.setdefault(name, (_hw(inputs[0]), _hw(output)))
        return hook

    hooks = [m.register_forward_hook(recorder(n)) for n, m in modules]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        probe_forward(model, torch.zeros((1,) + tuple(input_shape[-3:]), device=device, dtype=model_dtype(model)))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for n, m in modules:
        in_hw, out_hw = seen.get(n, ((1, 1), (1, 1)))
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str):
                raise ModelError(f"conv {n!r} uses padding={m.padding!r}; prunekit needs explicit padding")
            layers.append(LayerInfo(n, "conv", tuple(m.weight.shape), m.in_channels, m.out_channels, m.groups,
                                    tuple(m.stride), m.bias is not None, in_hw, out_hw, tuple(m.padding)))
        else:
            layers.append(LayerInfo(n, "linear", tuple(m.weight.shape), m.in_features, m.out_features, 1,
                                    (1, 1), m.bias is not None, (1, 1), (1, 1)))
    return layers


class TorchModelHandle(ModelHandle):
    """Reads and writes a PyTorch model's prunable weights and its whole state by shared name."""

    backend = "torch"

    def __init__(self, model: nn.Module, input_shape: Sequence[int], model_name: str = "model"):
        #: the model the user passed (a compiled wrapper stays usable for their own forward passes)
        self.compiled = model
        model = unwrap_compiled(model)
        self.model = model
        self.ops = TorchOps()
        self.model_name = model_name
        self.input_shape = tuple(input_shape)
        self.layers = require_prunable(discover_layers(model, input_shape), model_name)
        self._modules = dict(model.named_modules())

    def module(self, layer: str) -> nn.Module:
        return self._modules[layer]

    def weight(self, layer):
        return self._modules[layer].weight.data

    def set_weight(self, layer, value):
        with torch.no_grad():
            self._modules[layer].weight.copy_(value)

    def mul_weight_(self, layer, mask):
        with torch.no_grad():
            self._modules[layer].weight.mul_(mask)

    def predict(self, x):
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                xb = torch.as_tensor(np.asarray(x, np.float32), device=device).to(model_dtype(self.model))
                return self.model(xb).float().cpu().numpy()
        finally:
            self.model.train(was_training)

    def forward(self, x):
        return self.model(x)

    def set_training(self, training):
        was = self.model.training
        self.model.train(bool(training))
        return was

    def parameters_by_name(self) -> Dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    # whole-model state under the shared names (num_batches_tracked is torch-only and skipped)
    def state_numpy(self):
        return {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).cpu().numpy().copy()
                for k, v in self.model.state_dict().items() if not k.endswith("num_batches_tracked")}

    def state_shapes(self):
        bn_names = {n for n, m in self.model.named_modules() if isinstance(m, _BN)}
        return {k: (tuple(v.shape), k.rsplit(".", 1)[0] in bn_names) for k, v in self.model.state_dict().items()
                if not k.endswith("num_batches_tracked")}

    def load_state_numpy(self, state, strict=True):
        own = self.model.state_dict()
        own_keys = {k for k in own if not k.endswith("num_batches_tracked")}
        if strict:
            missing = sorted(own_keys - set(state))
            extra = sorted(set(state) - own_keys)
            if missing or extra:
                raise PlanError(f"state does not match model {self.model_name!r}: missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in state.items():
            if k in own and tuple(own[k].shape) != tuple(np.shape(v)):
                raise PlanError(f"state entry {k!r} has shape {tuple(np.shape(v))}, model {self.model_name!r} expects {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, v in state.items():
                if k in own:
                    own[k].copy_(torch.as_tensor(np.asarray(v), dtype=own[k].dtype))

    def initialize(self, seed: int) -> None:
        """Load the shared NumPy initialisation (identical on every backend for a seed)."""
        self.load_state_numpy(init_state(self.state_shapes(), seed))

