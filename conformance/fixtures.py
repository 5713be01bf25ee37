"""Inputs shared by the conformance cases: seeded NumPy arrays and an in-memory model handle.

:class:`ArrayHandle` is a :class:`~prunekit.contract.handle.ModelHandle` over plain tensors of one
backend, so decision cases can run the real algorithms on chosen weights (ties, zeros,
rank-deficient matrices) without building a network.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from prunekit.contract.handle import ModelHandle
from prunekit.contract.layers import LayerInfo


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def layer_info(name: str, shape, groups: int = 1, out_hw=(8, 8)) -> LayerInfo:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4:
        return LayerInfo(name, "conv", shape, shape[1] * groups, shape[0], groups, (1, 1), False, out_hw, out_hw)
    return LayerInfo(name, "linear", shape, shape[1], shape[0])


class ArrayHandle(ModelHandle):
    def __init__(self, ops, weights: Dict[str, np.ndarray], groups: Dict[str, int] | None = None,
                 model_name: str = "arrays"):
        self.ops = ops
        self.model_name = model_name
        groups = groups or {}
        self.layers: List[LayerInfo] = [layer_info(n, w.shape, groups.get(n, 1)) for n, w in weights.items()]
        self._w = {n: ops.asarray(w) for n, w in weights.items()}

    def weight(self, layer):
        return self._w[layer]

    def set_weight(self, layer, value):
        self._w[layer] = value

    def mul_weight_(self, layer, mask):
        self._w[layer] = self._w[layer] * mask

    def state_numpy(self):
        return {f"{n}.weight": self.ops.to_numpy(w) for n, w in self._w.items()}

    def load_state_numpy(self, state, strict=True):
        for n in self._w:
            self._w[n] = self.ops.asarray(state[f"{n}.weight"])

    def predict(self, x):
        raise NotImplementedError("an ArrayHandle holds weights, not a network")


def weight_scenarios() -> Dict[str, Dict[str, np.ndarray]]:
    """Named sets of layer weights that stress the decision rules."""
    r = rng(7)
    low_rank = (r.standard_normal((32, 3)) @ r.standard_normal((3, 72))).reshape(32, 8, 3, 3)
    return {
        "random": {
            "conv1": r.standard_normal((16, 3, 3, 3)), "conv2": r.standard_normal((32, 16, 3, 3)),
            "fc": r.standard_normal((10, 32)),
        },
        "exact_ties": {  # few distinct values: ties everywhere, also across layers
            "conv1": r.integers(-3, 4, (16, 8, 3, 3)).astype(float), "conv2": r.integers(-3, 4, (16, 16, 1, 1)).astype(float),
            "fc": r.integers(-2, 3, (10, 16)).astype(float),
        },
        "all_zero_layer": {
            "conv1": r.standard_normal((8, 3, 3, 3)), "conv2": np.zeros((16, 8, 3, 3)),
            "fc": r.standard_normal((10, 16)),
        },
        "rank_deficient": {"conv_lowrank": low_rank, "fc": r.standard_normal((10, 32))},
        "pointwise_and_depthwise": {
            "expand": r.standard_normal((48, 8, 1, 1)), "depthwise": r.standard_normal((48, 1, 3, 3)),
            "project": r.standard_normal((16, 48, 1, 1)),
        },
        "constant": {"conv1": np.full((8, 4, 3, 3), 0.5), "fc": np.full((4, 8), -0.5)},
    }


DEPTHWISE_GROUPS = {"depthwise": 48}

#: the scenarios the rank-based cases (RPG, TRP) run on
RANK_SCENARIOS = ("random", "exact_ties", "all_zero_layer", "rank_deficient", "pointwise_and_depthwise")


def float32_weights(scenario: str) -> Dict[str, np.ndarray]:
    """The layer weights of one of :func:`weight_scenarios`, as float32."""
    return {k: v.astype(np.float32) for k, v in weight_scenarios()[scenario].items()}
