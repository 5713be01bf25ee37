"""The neutral view of a prunable layer, as each backend's discovery reports it.

A :class:`LayerInfo` is plain data (no tensors): the layer's name in the model, its kind, the
weight's shape in the shared layout ``(C_out, C_in/groups, kh, kw)`` for convolutions and
``(out, in)`` for linear layers, and the spatial sizes seen in a probe forward pass (needed for
FLOPs). Both backends name layers by the same scheme (PyTorch's dotted module paths), so a name
means the same layer everywhere.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

from prunekit.errors import ModelError


@dataclass(frozen=True)
class LayerInfo:
    name: str                      # module path, e.g. "layer1.0.conv1"
    kind: str                      # "conv" or "linear"
    weight_shape: Tuple[int, ...]  # (C_out, C_in/groups, kh, kw) or (out, in)
    in_channels: int
    out_channels: int
    groups: int = 1
    stride: Tuple[int, int] = (1, 1)
    has_bias: bool = False
    input_hw: Tuple[int, int] = (1, 1)   # spatial size of the input in the probe pass
    output_hw: Tuple[int, int] = (1, 1)  # spatial size of the output in the probe pass
    padding: Tuple[int, int] = (0, 0)    # symmetric zero padding (top/bottom, left/right)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return tuple(self.weight_shape[2:4]) if self.kind == "conv" else (1, 1)

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels

    @property
    def numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def macs_per_weight(self) -> int:
        """Multiply-accumulates one weight entry costs per sample (output positions)."""
        if self.kind == "conv":
            return self.output_hw[0] * self.output_hw[1]
        return 1

    def to_dict(self) -> dict:
        return asdict(self)


def require_prunable(layers: Sequence[LayerInfo], model_name: str = "model") -> List[LayerInfo]:
    """Raise a clear error when a model has no prunable layer."""
    layers = list(layers)
    if not layers:
        raise ModelError(f"{model_name} has no prunable layer (no Conv2d or Linear/Dense with a weight)")
    return layers


def signature(layers: Sequence[LayerInfo]) -> List[Tuple[str, Tuple[int, ...]]]:
    """What identifies a model for plans and checkpoints: layer names and weight shapes."""
    return [(l.name, tuple(int(d) for d in l.weight_shape)) for l in layers]
