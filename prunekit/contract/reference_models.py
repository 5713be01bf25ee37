"""Reference model catalogue and the shared, framework-independent weight initialisation.

Each backend defines the same architectures in ``backends/<name>/models.py`` under one
parameter-naming scheme (PyTorch's). Initial weights are drawn here, in NumPy, from a seed and
the parameter name, so a model built with the same seed is identical on every backend: the
conformance suite and cross-framework comparisons start from the same point.
"""
from __future__ import annotations

import zlib
from typing import Dict, Tuple

import numpy as np

from prunekit.errors import ConfigError

#: name -> short description
MODELS = {
    "resnet20": "CIFAR ResNet-20 (basic blocks, 0.27M params)",
    "resnet32": "CIFAR ResNet-32 (basic blocks, 0.46M params)",
    "resnet56": "CIFAR ResNet-56 (basic blocks, 0.85M params)",
    "vgg16": "VGG-16 with BatchNorm for 32x32 input",
    "vgg19": "VGG-19 with BatchNorm for 32x32 input",
    "mobilenetv2": "MobileNetV2 for 32x32 input (depthwise convs)",
    "mnist_cnn": "small CNN for 28x28 grey images (2 conv + 2 linear)",
}

BN_SUFFIXES = ("running_mean", "running_var")


def check_model_name(name: str) -> str:
    key = str(name).lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return key


def init_array(name: str, shape: Tuple[int, ...], seed: int, is_bn: bool) -> np.ndarray:
    """The initial value of one parameter or buffer, from its shared name.

    Conv weights: Kaiming normal with fan-out (as torchvision's ResNets). Linear weights:
    normal with std 1/sqrt(fan-in) (the variance of PyTorch's default uniform init, times 3). BN: weight 1, bias 0, running mean 0, running var 1. Biases 0.
    """
    shape = tuple(int(d) for d in shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var" or (is_bn and leaf == "weight"):
        return np.ones(shape, np.float32)
    if leaf != "weight" or len(shape) < 2:
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    if len(shape) == 4:
        std = np.sqrt(2.0 / max(1, shape[0] * shape[2] * shape[3]))
    else:
        std = np.sqrt(1.0 / max(1, shape[1]))
    return (rng.standard_normal(shape) * std).astype(np.float32)


def init_state(shapes: Dict[str, Tuple[Tuple[int, ...], bool]], seed: int) -> Dict[str, np.ndarray]:
    """Initial values for ``{name: (shape, is_batchnorm)}``."""
    return {n: init_array(n, s, seed, bn) for n, (s, bn) in shapes.items()}
