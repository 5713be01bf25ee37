"""Tiny networks of a user's own, named as ``own_models:tiny_torch`` / ``own_models:tiny_mindspore``
(``package.module:function`` factories) by the tests of ``--model``; the framework is imported
inside each factory, so importing this file needs neither."""


def tiny_torch(num_classes=10, in_channels=3, width=4):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))


def tiny_mindspore(num_classes=10, in_channels=3, width=4):
    import mindspore.nn as nn
    import mindspore.ops as ops

    class Tiny(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, pad_mode="pad", padding=1, has_bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, pad_mode="pad", padding=1, has_bias=True)
            self.relu = nn.ReLU()
            self.fc = nn.Dense(2 * width, num_classes)

        def construct(self, x):
            x = self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.fc(ops.mean(x, (2, 3)))

    return Tiny()


def not_a_network(num_classes=10):
    return "a string"


def needs_64(num_classes=10):
    """A network that accepts 64x64 images only (as many fixed-size models do)."""
    import torch.nn as nn

    class Fixed(nn.Linear):
        def forward(self, x):
            assert x.shape[-1] == 64, f"expected 64x64 images, got {tuple(x.shape[-2:])}"
            return super().forward(x.flatten(1))

    return Fixed(3 * 64 * 64, num_classes)
