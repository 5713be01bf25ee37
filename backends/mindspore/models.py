"""Reference models in MindSpore: twins of ``backends/torch/models.py``, layer for layer, built
from the architecture tables of :mod:`prunekit.contract.reference_models`.

Cells are assigned in the same order and under the same attribute names as the PyTorch
modules, and ``nn.SequentialCell`` numbers its children "0", "1", ... as ``nn.Sequential`` does,
so every parameter has the PyTorch name once BatchNorm's ``gamma``/``beta``/``moving_mean``/
``moving_variance`` are read as ``weight``/``bias``/``running_mean``/``running_var`` (that
mapping lives in ``layers.py``). Weights move between the twins through NumPy state dicts.

Framework differences handled here:

* ``Conv2d`` uses ``pad_mode="pad"`` with PyTorch's explicit padding and ``has_bias`` as in torch.
* BatchNorm momentum is defined the other way round: PyTorch's 0.1 is MindSpore's 0.9. MindSpore
  updates the running variance with the unbiased batch variance, as PyTorch does (checked by
  ``tests/backends/test_twins.py``). eps is 1e-5 in both.
* An empty shortcut is an empty ``SequentialCell`` (identity, no parameters), as in torch.
* The option-A shortcut avoids two MindSpore 2.10 CPU gradient bugs: a strided slice's
  gradient fails in PyNative, and ``ops.pad``'s gradient is wrong inside ``mindspore.jit``
  (see :func:`subsample` and :func:`pad_channels`).
"""
from __future__ import annotations

import mindspore.nn as nn
import mindspore.ops as ops

from prunekit.contract.reference_models import (MBV2_HEAD, MBV2_STEM, MNIST_CONVS, MNIST_FEATURES, MNIST_HIDDEN,
                                                MNIST_KERNEL, VGG_CFG, build_reference, has_projection,
                                                mobilenetv2_blocks, resnet_stages)

__all__ = ["build_model", "CifarResNet", "CifarResNetB", "VGG", "MobileNetV2", "MnistCNN"]

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
    """Twin of the PyTorch ``CifarResNet``."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=1):
        super().__init__()
        stages = resnet_stages(depth, width)
        stem = stages[0][0][0]
        self.conv1 = conv2d(in_channels, stem, 3, 1, 1)
        self.bn1 = batch_norm(stem)
        self.layer1, self.layer2, self.layer3 = [nn.SequentialCell([BasicBlock(*b) for b in stage]) for stage in stages]
        self.fc = nn.Dense(stages[-1][-1][1], num_classes)

    def construct(self, x):
        x = ops.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(global_avg_flatten(x))


class ProjectionBlock(nn.Cell):
    """Twin of the PyTorch ``ProjectionBlock`` (1x1 conv + BN shortcut where the shape changes)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = conv2d(in_planes, planes, 3, stride, 1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, 1, 1)
        self.bn2 = batch_norm(planes)
        if has_projection(in_planes, planes, stride):
            self.shortcut = nn.SequentialCell([conv2d(in_planes, planes, 1, stride, 0), batch_norm(planes)])
        else:
            self.shortcut = nn.SequentialCell()

    def construct(self, x):
        out = ops.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return ops.relu(out + self.shortcut(x))


class CifarResNetB(CifarResNet):
    """Twin of the PyTorch ``CifarResNetB``."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=1):
        nn.Cell.__init__(self)
        stages = resnet_stages(depth, width)
        stem = stages[0][0][0]
        self.conv1 = conv2d(in_channels, stem, 3, 1, 1)
        self.bn1 = batch_norm(stem)
        self.layer1, self.layer2, self.layer3 = [nn.SequentialCell([ProjectionBlock(*b) for b in stage])
                                                 for stage in stages]
        self.fc = nn.Dense(stages[-1][-1][1], num_classes)


class VGG(nn.Cell):
    """Twin of the PyTorch ``VGG``."""

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


class MobileNetV2(nn.Cell):
    """Twin of the PyTorch ``MobileNetV2``."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        blocks = mobilenetv2_blocks()
        self.conv1 = conv2d(in_channels, MBV2_STEM, 3, 1, 1)
        self.bn1 = batch_norm(MBV2_STEM)
        self.layers = nn.SequentialCell([InvertedResidual(*b) for b in blocks])
        self.conv2 = conv2d(blocks[-1][1], MBV2_HEAD, 1, 1, 0)
        self.bn2 = batch_norm(MBV2_HEAD)
        self.fc = nn.Dense(MBV2_HEAD, num_classes)

    def construct(self, x):
        x = ops.relu(self.bn1(self.conv1(x)))
        x = ops.relu(self.bn2(self.conv2(self.layers(x))))
        return self.fc(global_avg_flatten(x))


class MnistCNN(nn.Cell):
    """Twin of the PyTorch ``MnistCNN``."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        c1, c2 = MNIST_CONVS
        pad = MNIST_KERNEL // 2
        self.conv1 = conv2d(in_channels, c1, MNIST_KERNEL, 1, pad, bias=True)
        self.conv2 = conv2d(c1, c2, MNIST_KERNEL, 1, pad, bias=True)
        self.fc1 = nn.Dense(MNIST_FEATURES, MNIST_HIDDEN)
        self.fc2 = nn.Dense(MNIST_HIDDEN, num_classes)
        self.pool = nn.MaxPool2d(2, 2)

    def construct(self, x):
        x = self.pool(ops.relu(self.conv1(x)))
        x = self.pool(ops.relu(self.conv2(x)))
        x = ops.relu(self.fc1(ops.flatten(x)))
        return self.fc2(x)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> nn.Cell:
    """Build a reference model (framework default init; see ``layers.initialize`` for the shared one)."""
    return build_reference(name, ARCHITECTURES, num_classes, in_channels, width)


ARCHITECTURES = {"resnet": CifarResNet, "resnet_projection": CifarResNetB, "vgg": VGG, "mobilenetv2": MobileNetV2,
                 "mnist_cnn": MnistCNN}
