"""Reference model catalogue, the architectures' tables, and the shared, framework-independent
weight initialisation.

The layer configurations of the reference models (ResNet stages, VGG and MobileNetV2 tables,
the MNIST CNN's widths) are data here; each backend's ``backends/<name>/models.py`` only builds
those layers in its framework, under one parameter-naming scheme, and
:func:`build_reference` picks the architecture for a model name. Initial weights are drawn here,
in NumPy, from a seed and the parameter name, so a model built with the same seed is identical
on every backend: the conformance suite and cross-framework comparisons start from the same point.
"""
from __future__ import annotations

import zlib
from typing import Callable, Dict, List, Mapping, Tuple

import numpy as np

from prunekit.errors import ConfigError

#: name -> short description
MODELS = {
    "resnet20": "CIFAR ResNet-20 (basic blocks, 0.27M params)",
    "resnet32": "CIFAR ResNet-32 (basic blocks, 0.46M params)",
    "resnet56": "CIFAR ResNet-56 (basic blocks, 0.85M params)",
    "resnet20b": "CIFAR ResNet-20 with projection shortcuts (1x1 conv + BN where the shape changes)",
    "resnet32b": "CIFAR ResNet-32 with projection shortcuts (1x1 conv + BN where the shape changes)",
    "resnet56b": "CIFAR ResNet-56 with projection shortcuts (1x1 conv + BN where the shape changes)",
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


# ---------------------------------------------------------------------------- architectures
#: VGG with BatchNorm: each number a 3x3 conv (padding 1, no bias) + BN + ReLU, "M" a 2x2 max pool
VGG_CFG = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

#: MobileNetV2 for 32x32 input: (expansion, output channels, blocks, stride of the first block)
MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
#: MobileNetV2's stem (3x3 conv, stride 1) and head (1x1 conv) widths
MBV2_STEM, MBV2_HEAD = 32, 1280

#: MNIST CNN: two 5x5 convs (padding 2, with bias), each followed by ReLU and a 2x2 max pool
#: (28x28 -> 7x7), then a hidden linear layer
MNIST_CONVS, MNIST_KERNEL, MNIST_HIDDEN = (32, 64), 5, 128
MNIST_FEATURES = MNIST_CONVS[-1] * 7 * 7


def resnet_stages(depth: int, width: int = 1) -> List[List[Tuple[int, int, int]]]:
    """``(in channels, out channels, stride)`` of every basic block of He et al.'s CIFAR ResNet
    (6n+2 layers), stage by stage; the stem is a 3x3 conv to ``stages[0][0][0]`` channels. The
    first block of stages 2 and 3 halves the resolution; ``width`` scales the channels."""
    n = (depth - 2) // 6
    planes = 16 * width
    stages = []
    for i, out in enumerate((16 * width, 32 * width, 64 * width)):
        blocks = []
        for j in range(n):
            blocks.append((planes, out, 2 if (j == 0 and i > 0) else 1))
            planes = out
        stages.append(blocks)
    return stages


#: CIFAR ResNets whose shortcut is a 1x1 conv (stride of the block, no bias) + BN wherever the
#: block changes the shape, identity elsewhere: the "option B" of He et al., and the
#: ``downsample="conv"`` blocks of the DSA release (its ``cifar10_resnet*_dsconv`` models). Each
#: stage's residual stream is then produced by convs only (the projection and the blocks' second
#: convs), so its channels can be pruned; with option-A shortcuts they cannot.
PROJECTION_SUFFIX = "b"


def has_projection(in_planes: int, planes: int, stride: int) -> bool:
    """Whether a basic block of a projection-shortcut ResNet has a 1x1 conv + BN shortcut."""
    return stride != 1 or in_planes != planes


def mobilenetv2_blocks() -> List[Tuple[int, int, int, int]]:
    """``(in channels, out channels, expansion, stride)`` of every inverted residual block."""
    blocks, c = [], MBV2_STEM
    for expansion, out, n, stride in MBV2_CFG:
        for j in range(n):
            blocks.append((c, out, expansion, stride if j == 0 else 1))
            c = out
    return blocks


def build_reference(name: str, builders: Mapping[str, Callable], num_classes: int = 10, in_channels: int = 3,
                    width: int = 1):
    """The reference model ``name``, built by a backend's constructors: ``builders["resnet"](depth,
    num_classes, in_channels, width)`` (and ``builders["resnet_projection"]`` with the same
    arguments for the ``resnet<depth>b`` models), ``builders["vgg"](depth, num_classes,
    in_channels)``, ``builders["mobilenetv2"]`` and ``builders["mnist_cnn"]`` ``(num_classes,
    in_channels)``."""
    key = check_model_name(name)
    if key.startswith("resnet") and key.endswith(PROJECTION_SUFFIX):
        return builders["resnet_projection"](int(key[6:-len(PROJECTION_SUFFIX)]), num_classes, in_channels, width)
    if key.startswith("resnet"):
        return builders["resnet"](int(key[6:]), num_classes, in_channels, width)
    if key.startswith("vgg"):
        return builders["vgg"](int(key[3:]), num_classes, in_channels)
    return builders[key](num_classes, in_channels)


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
