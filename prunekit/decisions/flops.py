"""Parameter and FLOPs counting, measured from a model's current weights.

FLOPs are counted as multiply-accumulates (MACs) per sample, the pruning literature's
convention (CIFAR ResNet-20: 41M). A conv weight entry costs one MAC per output position; a
linear weight entry one MAC. "Effective" counts only non-zero weights (what a sparse kernel
would execute); "dense" counts every weight. BatchNorm, activations and pooling are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np

from prunekit.contract.layers import LayerInfo


@dataclass
class LayerCount:
    name: str
    kind: str
    weight_shape: tuple
    params: int
    nonzero: int
    dense_macs: int
    effective_macs: int
    kept_out_channels: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["sparsity"] = self.sparsity
        return d


def count_layer(layer: LayerInfo, weight: np.ndarray) -> LayerCount:
    w = np.asarray(weight)
    nonzero = int(np.count_nonzero(w))
    per_out = w.reshape(w.shape[0], -1)
    kept = int(np.count_nonzero(np.any(per_out != 0, axis=1)))
    macs = layer.macs_per_weight
    return LayerCount(layer.name, layer.kind, tuple(w.shape), int(w.size), nonzero,
                      int(w.size) * macs, nonzero * macs, kept)


def count_handle(handle) -> dict:
    """:func:`count_model` of a model handle: its layers, prunable weights and whole state."""
    return count_model(handle.layers, handle.weights_numpy(), handle.state_numpy())


def count_model(layers: List[LayerInfo], weights: Dict[str, np.ndarray], state: Dict[str, np.ndarray]) -> dict:
    """Per-layer counts and totals. ``state`` (all parameters) gives the whole-model parameter count."""
    per_layer = [count_layer(l, weights[l.name]) for l in layers]
    trainable = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var"))}
    total_params = int(sum(np.asarray(v).size for v in trainable.values()))
    total_nonzero = int(sum(np.count_nonzero(v) for v in trainable.values()))
    prunable = sum(c.params for c in per_layer)
    prunable_nz = sum(c.nonzero for c in per_layer)
    dense = sum(c.dense_macs for c in per_layer)
    eff = sum(c.effective_macs for c in per_layer)
    return {
        "layers": per_layer,
        "prunable_params": prunable,
        "prunable_nonzero": prunable_nz,
        "prunable_sparsity": 1.0 - prunable_nz / prunable if prunable else 0.0,
        "total_params": total_params,
        "total_nonzero": total_nonzero,
        "dense_macs": dense,
        "effective_macs": eff,
        "macs_kept_fraction": eff / dense if dense else 1.0,
    }
