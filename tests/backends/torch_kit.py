"""The PyTorch pieces of the backend behaviour template (``test_backend_behaviour.py``).

Everything the template cannot say without naming the framework lives here, and in
``mindspore_kit.py`` under the same names: a tiny custom network, the facts a framework module
states about itself, the framework's own random seed, an optimizer's settings, per-layer state and
learning rate, a user's own optimizer, and one step of a plain training loop around a
``PruningSession``. A new backend adds ``tests/backends/<name>_kit.py`` with these names.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.backends.torch.models import build_model  # noqa: F401  (the reference models, unwrapped)
from prunekit.backends.torch.optimizers import make_optimizer  # noqa: F401

#: steps of the Trainer run that keeps one mask through training
TRAINER_STEPS = 1000
#: Trainer keyword arguments that select the framework's uncompiled path (PyTorch has only that one)
EAGER = {}
#: relative tolerance of exp against NumPy
EXP_RTOL = 1e-6
#: the label dtype the framework's cross-entropy takes
LABELS = np.int64


def seed_framework(seed: int) -> None:
    """Seed the framework's global random generator (what the shared initialisation must ignore)."""
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- networks
class TinyCNN(nn.Module):
    """A user's network: conv + BN, a strided conv, a linear layer, on 1x12x12 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


#: (C, H, W) of TinyCNN's input
TINY_INPUT = (1, 12, 12)


def tiny_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN()


def relu_only() -> nn.Module:
    return nn.Sequential(nn.ReLU())


def bn_only() -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())


def prunable_modules(model: nn.Module) -> dict:
    """``{name: facts}`` of every Conv2d / Linear, in model order, as the modules state them."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = dict(kind="conv", weight_shape=tuple(m.weight.shape), has_bias=m.bias is not None,
                             in_channels=m.in_channels, out_channels=m.out_channels, groups=m.groups,
                             kernel_size=tuple(m.kernel_size), stride=tuple(m.stride), numel=m.weight.numel())
        elif isinstance(m, nn.Linear):
            out[name] = dict(kind="linear", weight_shape=tuple(m.weight.shape), has_bias=m.bias is not None,
                             in_channels=m.in_features, out_channels=m.out_features, numel=m.weight.numel())
    return out


def hooks_left(model: nn.Module) -> int:
    """Forward hooks still registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def is_parameter(p) -> bool:
    """Whether ``p`` is the framework's trainable parameter type."""
    return isinstance(p, nn.Parameter) and p.requires_grad


# ---------------------------------------------------------------------------- optimizers
def optimizer_settings(optimizer) -> dict:
    """kind ("sgd" / "adam"), momentum, weight decay, and whether one setting covers every parameter."""
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}.get(type(optimizer), type(optimizer).__name__)
    group = optimizer.param_groups[0]
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    return dict(kind=kind, momentum=group.get("momentum"), weight_decay=group["weight_decay"],
                decays_every_parameter=len(optimizer.param_groups) == 1 and group["weight_decay"] > 0,
                parameters=n_params)


def optimizer_state(optimizer, handle) -> dict:
    """``{layer: [state tensors shaped like its weight, as NumPy]}`` (empty before the first step)."""
    out = {}
    for l in handle.layers:
        p = handle.module(l.name).weight
        values = [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        if values:
            out[l.name] = [v.detach().cpu().numpy() for v in values]
    return out


def learning_rate(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def user_optimizer(model: nn.Module):
    """An optimizer of the user's choice, not one prunekit builds (RMSprop with momentum)."""
    return torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)


class PlainLoop:
    """A user's own training loop around a ``PruningSession``: forward, backward, step."""

    def __init__(self, handle, optimizer):
        self.handle, self.optimizer = handle, optimizer

    def step(self, session, x: np.ndarray, y: np.ndarray) -> dict:
        """One step; returns ``{layer: gradient the optimizer stepped with, as NumPy}``."""
        model = self.handle.model
        model.train()
        session.before_step()
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        self.optimizer.zero_grad()
        loss.backward()
        session.after_backward()
        grads = {l.name: self.handle.module(l.name).weight.grad.numpy().copy() for l in self.handle.layers}
        if session.should_step():
            self.optimizer.step()
        session.after_optimizer_step()
        self.loss = float(loss.detach())
        return grads
