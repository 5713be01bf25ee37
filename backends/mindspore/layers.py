"""Prunable-layer discovery and the :class:`~prunekit.contract.handle.ModelHandle` for MindSpore models.

Any ``nn.Conv2d`` (grouped and depthwise included) or ``nn.Dense`` is prunable. Spatial sizes
for FLOPs come from one probe forward pass with forward hooks (``Cell.register_forward_hook``,
PyNative only: the probe switches to PyNative for its duration if the context is in graph mode),
in eval mode.

Names: a cell's path from ``cells_and_names()`` is its PyTorch module path, and a parameter's
shared name is ``<cell path>.<leaf>`` where BatchNorm's leaves are renamed to PyTorch's
(:data:`BN_LEAVES`). MindSpore's own ``Parameter.name`` is left alone, so MindSpore checkpoints
keep working.

Writes to a Parameter go through ``Tensor.copy_``, the cheapest eager in-place update measured
in MindSpore 2.10 PyNative on CPU (about 0.2 ms for multiply-and-write of a 256x256x3x3 weight,
against 0.8 ms with ``ops.assign`` and 1.7 ms with ``Parameter.set_data``); the training driver
masks all layers at once in one compiled call instead (``fused.mul_all_``).
``Tensor.mul_`` must not be used: on a Parameter it silently leaves the Parameter unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.errors import ModelError, PlanError
from prunekit.contract.handle import ModelHandle
from prunekit.contract.layers import LayerInfo, require_prunable
from prunekit.contract.reference_models import init_state

from .ops import MindSporeOps

PRUNABLE = (nn.Conv2d, nn.Dense)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
#: MindSpore BatchNorm leaf -> shared (PyTorch) leaf, in PyTorch's state_dict order
BN_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
#: shared leaves that are PyTorch buffers, not parameters
BUFFER_LEAVES = ("running_mean", "running_var")


def _hw(shape) -> Tuple[int, int]:
    return (int(shape[-2]), int(shape[-1])) if len(shape) == 4 else (1, 1)


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(d) for d in v)
    return v[-2:] if len(v) >= 2 else (v[0], v[0])


@contextmanager
def probe_mode(model: nn.Cell):
    """Eval mode in PyNative (switched to for the pass if the context is in graph mode) for a
    probe pass; the train flag and the mode are restored after."""
    graph = ms.get_context("mode") != ms.PYNATIVE_MODE
    if graph:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    was_training = model.training
    try:
        model.set_train(False)
        yield
    finally:
        model.set_train(was_training)
        if graph:
            ms.set_context(mode=ms.GRAPH_MODE)


def probe_forward(model, x):
    """The model's output on ``x`` in :func:`probe_mode`."""
    with probe_mode(model):
        return model(x)


def _probe(model: nn.Cell, input_shape: Sequence[int], cells) -> Dict[str, tuple]:
    seen: Dict[str, tuple] = {}

    def recorder(name):
        def hook(cell, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(name, (_hw(inputs[0].shape), _hw(output.shape)))
        return hook

    handles = []
    try:
        handles = [c.register_forward_hook(recorder(n)) for n, c in cells]
        probe_forward(model, ms.Tensor(np.zeros((1,) + tuple(int(d) for d in input_shape[-3:]), np.float32)))
    finally:
        for h in handles:
            h.remove()
    return seen


PAD_MODES = ("same", "valid", "pad")


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """MindSpore's ``pad_mode="same"`` along one axis of extent ``size``: (before, after).

    The output has ``ceil(size / stride)`` positions; the padding needed for it is split with
    the odd unit after (bottom/right), so a stride-2 or even kernel pads asymmetrically, by an
    amount that depends on the input size.
    """
    out = -(-int(size) // int(stride))
    total = max((out - 1) * int(stride) + (int(kernel) - 1) * int(dilation) + 1 - int(size), 0)
    return total // 2, total - total // 2


def conv_pads(name: str, conv: nn.Conv2d, input_hw: Sequence[int]) -> Tuple[int, int, int, int]:
    """The zero padding (top, bottom, left, right) ``conv`` applies to an input of spatial size
    ``input_hw``, for each of MindSpore's ``pad_mode`` values ``"same"`` (its default),
    ``"valid"`` and ``"pad"``; any other mode, or NHWC data, raises :class:`ModelError` naming
    the layer."""
    mode = str(conv.pad_mode).lower()
    if mode not in PAD_MODES:
        raise ModelError(f"conv {name!r} has pad_mode={conv.pad_mode!r}; prunekit supports {', '.join(PAD_MODES)}")
    if str(getattr(conv, "data_format", "NCHW")).upper() != "NCHW":
        raise ModelError(f"conv {name!r} has data_format={conv.data_format!r}; prunekit supports NCHW convolutions")
    if mode == "valid":
        return (0, 0, 0, 0)
    if mode == "same":
        (kh, kw), (sh, sw), (dh, dw) = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
        return same_pads(input_hw[0], kh, sh, dh) + same_pads(input_hw[1], kw, sw, dw)
    pad = conv.padding
    if isinstance(pad, int):
        return (pad,) * 4
    pad = tuple(int(p) for p in pad)
    return pad if len(pad) == 4 else (pad[0], pad[0], pad[-1], pad[-1])


def conv_padding(name: str, conv: nn.Conv2d, input_hw: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """A conv's leading zero padding (top, left) on an input of size ``input_hw`` (see
    :func:`conv_pads`): the :attr:`LayerInfo.padding` discovery reports. It is the whole
    padding when the conv pads symmetrically; an asymmetric one (``"same"`` with stride 2 or an
    even kernel, or an explicit 4-tuple) is reproduced from the cell itself by compaction (the
    same ``pad_mode``/``padding``) and by TRP's surgery (:mod:`.surgery`), never from this pair.
    """
    top, _, left, _ = conv_pads(name, conv, input_hw)
    return (top, left)


def discover_layers(model: nn.Cell, input_shape: Sequence[int]) -> List[LayerInfo]:
    """Every Conv2d/Dense in definition order, with spatial sizes from a probe forward pass."""
    cells = [(n, c) for n, c in model.cells_and_names() if isinstance(c, PRUNABLE)]
    seen = _probe(model, input_shape, cells)
    layers = []
    for n, c in cells:
        in_hw, out_hw = seen.get(n, ((1, 1), (1, 1)))
        if isinstance(c, nn.Conv2d):
            layers.append(LayerInfo(n, "conv", tuple(int(d) for d in c.weight.shape), int(c.in_channels),
                                    int(c.out_channels), int(c.group), _pair(c.stride), bool(c.has_bias),
                                    in_hw, out_hw, conv_padding(n, c, in_hw)))
        else:
            layers.append(LayerInfo(n, "linear", tuple(int(d) for d in c.weight.shape), int(c.in_channels),
                                    int(c.out_channels), 1, (1, 1), bool(c.has_bias), (1, 1), (1, 1)))
    return layers


def named_state(model: nn.Cell) -> Dict[str, Tuple[ms.Parameter, bool]]:
    """``{shared name: (Parameter, is_batchnorm)}`` for every parameter and BN statistic."""
    out: Dict[str, Tuple[ms.Parameter, bool]] = {}
    for path, cell in model.cells_and_names():
        own = cell._params  # the cell's direct parameters, by attribute name
        prefix = f"{path}." if path else ""
        if isinstance(cell, _BN):
            for leaf, shared in BN_LEAVES.items():
                if own.get(leaf) is not None:
                    out[prefix + shared] = (own[leaf], True)
        else:
            for leaf, p in own.items():
                if p is not None:
                    out[prefix + leaf] = (p, False)
    return out


def write_(param: ms.Parameter, value) -> None:
    """Overwrite a Parameter's values in place (same object, dtype kept)."""
    if value.dtype != param.dtype:
        value = msops.cast(value, param.dtype)
    param.copy_(value)


class MindSporeModelHandle(ModelHandle):
    """Reads and writes a MindSpore model's prunable weights and its whole state by shared name."""

    backend = "mindspore"

    def __init__(self, model: nn.Cell, input_shape: Sequence[int], model_name: str = "model",
                 ops: MindSporeOps | None = None):
        self.model = model
        self.ops = ops or MindSporeOps()
        self.model_name = model_name
        self.input_shape = tuple(input_shape)
        self.layers = require_prunable(discover_layers(model, input_shape), model_name)
        self._cells = dict(model.cells_and_names())
        self._state = named_state(model)

    def module(self, layer: str) -> nn.Cell:
        return self._cells[layer]

    def weight(self, layer):
        return self._cells[layer].weight

    def set_weight(self, layer, value):
        write_(self._cells[layer].weight, value)

    def set_weights(self, values):
        # one compiled assignment instead of an eager copy per layer (PyNative ops cost ~1 ms)
        from .fused import assign_many
        assign_many([self._cells[n].weight for n in values], list(values.values()))

    def mul_weight_(self, layer, mask):
        w = self._cells[layer].weight
        write_(w, w * mask)

    def predict(self, x):
        was_training = self.model.training
        self.model.set_train(False)
        try:
            return self.model(ms.Tensor(np.ascontiguousarray(x, dtype=np.float32))).asnumpy()
        finally:
            self.model.set_train(was_training)

    def forward(self, x):
        return self.model(x)

    def set_training(self, training):
        was = bool(self.model.training)
        self.model.set_train(bool(training))
        return was

    def parameters_by_name(self) -> Dict[str, ms.Parameter]:
        """Trainable parameters under the shared names (BN statistics are buffers, as in torch)."""
        return {k: p for k, (p, bn) in self._state.items() if not (bn and k.rsplit(".", 1)[-1] in BUFFER_LEAVES)}

    def shared_names(self) -> Dict[int, str]:
        """``{id(Parameter): shared name}``, to match optimizer entries to names."""
        return {id(p): k for k, (p, _) in self._state.items()}

    # whole-model state under the shared names
    def state_numpy(self):
        return {k: p.asnumpy().copy() for k, (p, _) in self._state.items()}

    def state_shapes(self):
        return {k: (tuple(int(d) for d in p.shape), bn) for k, (p, bn) in self._state.items()}

    def load_state_numpy(self, state, strict=True):
        own = self._state
        if strict:
            missing = sorted(set(own) - set(state))
            extra = sorted(set(state) - set(own))
            if missing or extra:
                raise PlanError(f"state does not match model {self.model_name!r}: missing {missing[:3]}, "
                                f"unexpected {extra[:3]}")
        for k, v in state.items():
            if k in own and tuple(own[k][0].shape) != tuple(np.shape(v)):
                raise PlanError(f"state entry {k!r} has shape {tuple(np.shape(v))}, model {self.model_name!r} "
                                f"expects {tuple(own[k][0].shape)}")
        for k, v in state.items():
            if k in own:
                p = own[k][0]
                write_(p, ms.Tensor(np.ascontiguousarray(np.asarray(v)), dtype=p.dtype))

    def initialize(self, seed: int) -> None:
        """Load the shared NumPy initialisation (identical on every backend for a seed)."""
        self.load_state_numpy(init_state(self.state_shapes(), seed))
