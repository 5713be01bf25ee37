"""Reference models in PyTorch, built from the architecture tables of
:mod:`prunekit.contract.reference_models`. Their twins with identical parameter names live in
``backends/mindspore/models.py``; weights move between them through NumPy state dicts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.contract.reference_models import (MBV2_HEAD, MBV2_STEM, MNIST_CONVS, MNIST_FEATURES, MNIST_HIDDEN,
                                                MNIST_KERNEL, VGG_CFG, build_reference, has_projection,
                                                mobilenetv2_blocks, resnet_stages)

__all__ = ["build_model", "CifarResNet", "CifarResNetB", "VGG", "MobileNetV2", "MnistCNN"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option-A shortcut: subsample and zero-pad channels

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, option-A shortcuts); ``width`` scales channels."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=1):
        super().__init__()
        stages = resnet_stages(depth, width)
        stem = stages[0][0][0]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1, self.layer2, self.layer3 = [nn.Sequential(*(BasicBlock(*b) for b in stage)) for stage in stages]
        self.fc = nn.Linear(stages[-1][-1][1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class ProjectionBlock(nn.Module):
    """Basic block whose shortcut is a 1x1 conv + BN where the shape changes (option B)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if has_projection(in_planes, planes, stride):
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetB(nn.Module):
    """CIFAR ResNet with projection shortcuts (``resnet<depth>b``); otherwise as ``CifarResNet``."""

    def __init__(self, depth=20, num_classes=10, in_channels=3, width=1):
        super().__init__()
        stages = resnet_stages(depth, width)
        stem = stages[0][0][0]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1, self.layer2, self.layer3 = [nn.Sequential(*(ProjectionBlock(*b) for b in stage))
                                                 for stage in stages]
        self.fc = nn.Linear(stages[-1][-1][1], num_classes)

    forward = CifarResNet.forward


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 input: ``features.{i}`` as torchvision, one linear classifier."""

    def __init__(self, depth=16, num_classes=10, in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for v in VGG_CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        hidden = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, hidden, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.has_residual = stride == 1
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.has_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 input (stem stride 1, second stage stride 1)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        blocks = mobilenetv2_blocks()
        self.conv1 = nn.Conv2d(in_channels, MBV2_STEM, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(MBV2_STEM)
        self.layers = nn.Sequential(*(InvertedResidual(*b) for b in blocks))
        self.conv2 = nn.Conv2d(blocks[-1][1], MBV2_HEAD, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(MBV2_HEAD)
        self.fc = nn.Linear(MBV2_HEAD, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(self.layers(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class MnistCNN(nn.Module):
    """Two 5x5 convs (with bias) and two linear layers, for 28x28 input."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        c1, c2 = MNIST_CONVS
        pad = MNIST_KERNEL // 2
        self.conv1 = nn.Conv2d(in_channels, c1, MNIST_KERNEL, 1, pad)
        self.conv2 = nn.Conv2d(c1, c2, MNIST_KERNEL, 1, pad)
        self.fc1 = nn.Linear(MNIST_FEATURES, MNIST_HIDDEN)
        self.fc2 = nn.Linear(MNIST_HIDDEN, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> nn.Module:
    """Build a reference model (framework default init; see ``layers.initialize`` for the shared one)."""
    return build_reference(name, ARCHITECTURES, num_classes, in_channels, width)


ARCHITECTURES = {"resnet": CifarResNet, "resnet_projection": CifarResNetB, "vgg": VGG, "mobilenetv2": MobileNetV2,
                 "mnist_cnn": MnistCNN}
