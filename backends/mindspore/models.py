"""Reference models in MindSpore: twins of ``backends/torch/models.py``, layer for layer.

Cells are assigned in the same order and under the same attribute names as the PyTorch
modules, and ``nn.SequentialCell`` numbers its children "0", "1", ... as ``nn.Sequential`` does,
so every parameter has the PyTorch name once BatchNorm's ``gamma``/``beta``/``moving_mean``/
``moving_variance`` are read as ``weight``/``bias``/``running_mean``/``running_var`` (that
mapping lives in ``layers.py``). Weights move between the twins through NumPy state dicts.

Framework differences handled here:

* ``Conv2d`` uses ``pad_mode="pad"`` with PyTorch's explicit padding and ``has_bias`` as in torch.
* BatchNorm momentum is defined the other way round: PyTorch's 0.1 is MindSpore's 0.9. MindSpore
  updates the running variance with the unbiased batch variance, as PyTorch does (checked by
  ``tests/test_twins.py``). eps is 1e-5 in both.
* An empty shortcut is an empty ``SequentialCell`` (identity, no parameters), as in torch.
* The option-A shortcut avoids two MindSpore 2.10 CPU gradient bugs: a strided slice's
  gradient fails in PyNative, and ``ops.pad``'s gradient is wrong inside ``mindspore.jit``
  (see :func:`subsample` and :func:`pad_channels`).
"""
from __future__ import annotations

import mindspore.nn as nn
import mindspore.ops as ops

from prunekit.contract.reference_models import check_model_name

__all__ = ["build_model", "CifarResNet", "VGG", "MobileNetV2", "MnistCNN"]

BN_MOMENTUM = 0.9  # = 1 - PyTorch's default momentum 0.1
BN_EPS = 1e-5


def conv2d(in_ch, out_ch, kernel, stride=1, padding=0, bias=False, groups=1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride, pad_mode="pad", padding=padding, has_bias=bias, group=groups)


def batch_norm(ch) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


def subsample(x, stride: int):
    """``x[:, :, ::stride, ::stride]``. Written as a 1x1 average pool because the gradient of a
    strided slice (StridedSliceGrad) fails on MindSpore 2.10's CPU kernel in PyNative mode."""
    return ops.avg_pool2d(x, 1, stride)


def pad_channels(x, front: int, back: int):
    """Zero channels before and after: ``F.pad(x, (0, 0, 0, 0, front, back))``. A concatenation,
    because the gradient of ``ops.pad`` comes out wrong from the second call on inside
    ``mindspore.jit`` on MindSpore 2.10 CPU."""
    n, _, h, w = x.shape
    parts = []
    if front:
        parts.append(ops.zeros((n, front, h, w), x.dtype))
    parts.append(x)
    if back:
        parts.append(ops.zeros((n, back, h, w), x.dtype))
    return ops.concat(parts, 1)


def global_avg_flatten(x):
    """``torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)``."""
    return ops.mean(x, (2, 3), False)


class BasicBlock(nn.Cell):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = conv2d(in_planes, planes, 3, stride, 1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, 1, 1)
        self.bn2 = batch_norm(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option-A shortcut: subsample and zero-pad channels

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        return pad_channels(subsample(x, self.stride), self.pad // 2, self.pad - self.pad // 2)

    def construct(self, x):
        out = ops.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return ops.relu(out + self.shortcut(x))


class CifarResNet(nn.Cell):
    """He et al.'s CIFAR ResNet (6n+2 layers, option-A shortcuts); ``width`` scales channels."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=1):
        super().__init__()
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = conv2d(in_channels, w[0], 3, 1, 1)
        self.bn1 = batch_norm(w[0])
        planes = w[0]
        stages = []
        for i, out in enumerate(w):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, out, 2 if (j == 0 and i > 0) else 1))
                planes = out
            stages.append(nn.SequentialCell(blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Dense(w[2], num_classes)

    def construct(self, x):
        x = ops.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(global_avg_flatten(x))


VGG_CFG = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Cell):
    """VGG with BatchNorm for 32x32 input: ``features.{i}`` as torchvision, one linear classifier."""

    def __init__(self, depth=16, num_classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [conv2d(c, v, 3, 1, 1), batch_norm(v), nn.ReLU()]
                c = v
        self.features = nn.SequentialCell(layers)
        self.classifier = nn.Dense(c, num_classes)

    def construct(self, x):
        return self.classifier(ops.flatten(self.features(x)))


class InvertedResidual(nn.Cell):
    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        hidden = expansion * in_planes
        self.stride = stride
        self.conv1 = conv2d(in_planes, hidden, 1, 1, 0)
        self.bn1 = batch_norm(hidden)
        self.conv2 = conv2d(hidden, hidden, 3, stride, 1, groups=hidden)
        self.bn2 = batch_norm(hidden)
        self.conv3 = conv2d(hidden, out_planes, 1, 1, 0)
        self.bn3 = batch_norm(out_planes)
        self.has_residual = stride == 1
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.SequentialCell([conv2d(in_planes, out_planes, 1, 1, 0), batch_norm(out_planes)])
        else:
            self.shortcut = nn.SequentialCell()

    def construct(self, x):
        out = ops.relu(self.bn1(self.conv1(x)))
        out = ops.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.has_residual:
            return out + self.shortcut(x)
        return out


MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Cell):
    """MobileNetV2 for 32x32 input (stem stride 1, second stage stride 1)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = conv2d(in_channels, 32, 3, 1, 1)
        self.bn1 = batch_norm(32)
        blocks, c = [], 32
        for expansion, out, n, stride in MBV2_CFG:
            for j in range(n):
                blocks.append(InvertedResidual(c, out, expansion, stride if j == 0 else 1))
                c = out
        self.layers = nn.SequentialCell(blocks)
        self.conv2 = conv2d(c, 1280, 1, 1, 0)
        self.bn2 = batch_norm(1280)
        self.fc = nn.Dense(1280, num_classes)

    def construct(self, x):
        x = ops.relu(self.bn1(self.conv1(x)))
        x = ops.relu(self.bn2(self.conv2(self.layers(x))))
        return self.fc(global_avg_flatten(x))


class MnistCNN(nn.Cell):
    """Two 5x5 convs (with bias) and two linear layers, for 28x28 input."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = conv2d(in_channels, 32, 5, 1, 2, bias=True)
        self.conv2 = conv2d(32, 64, 5, 1, 2, bias=True)
        self.fc1 = nn.Dense(64 * 7 * 7, 128)
        self.fc2 = nn.Dense(128, num_classes)
        self.pool = nn.MaxPool2d(2, 2)

    def construct(self, x):
        x = self.pool(ops.relu(self.conv1(x)))
        x = self.pool(ops.relu(self.conv2(x)))
        x = ops.relu(self.fc1(ops.flatten(x)))
        return self.fc2(x)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> nn.Cell:
    """Build a reference model (framework default init; see ``layers.initialize`` for the shared one)."""
    key = check_model_name(name)
    if key.startswith("resnet"):
        return CifarResNet(int(key[6:]), num_classes, in_channels, width)
    if key.startswith("vgg"):
        return VGG(int(key[3:]), num_classes, in_channels)
    if key == "mobilenetv2":
        return MobileNetV2(num_classes, in_channels)
    return MnistCNN(num_classes, in_channels)
