"""The MindSpore pieces of the backend behaviour template (``test_backend_behaviour.py``).

The same names as ``torch_kit.py``: a tiny custom network, the facts a framework cell states
about itself, the framework's own random seed, an optimizer's settings, per-layer state and
learning rate, a user's own optimizer, and one step of a plain training loop (MindSpore's
functional ``value_and_grad`` loop) around a ``PruningSession``.
"""
import numpy as np
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.backends.mindspore.driver import optimizer_state_by_layer
from prunekit.backends.mindspore.models import build_model  # noqa: F401  (the reference models, unwrapped)
from prunekit.backends.mindspore.optimizers import Adam, make_optimizer  # noqa: F401

#: steps of the Trainer run that keeps one mask through training (each step is a compiled call;
#: the 1,000-step exactness check on MindSpore is the functional loop's, in test_mindspore_only.py)
TRAINER_STEPS = 120
#: Trainer keyword arguments that select the uncompiled (PyNative) path
EAGER = {"jit": False}
#: relative tolerance of exp against NumPy  (MindSpore's CPU exp is off by up to ~3e-6)
EXP_RTOL = 1e-5
#: the label dtype the framework's cross-entropy takes
LABELS = np.int32


def seed_framework(seed: int) -> None:
    """Seed the framework's global random generator (what the shared initialisation must ignore)."""
    ms.set_seed(seed)


# ---------------------------------------------------------------------------- networks
class TinyCNN(nn.Cell):
    """A user's network: conv + BN, a strided conv, a dense layer, on 1x12x12 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, pad_mode="pad", padding=1, has_bias=True)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.9)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, pad_mode="pad", padding=1, has_bias=True)
        self.fc = nn.Dense(16 * 6 * 6, 10)

    def construct(self, x):
        x = msops.relu(self.bn1(self.conv1(x)))
        x = msops.relu(self.conv2(x))
        return self.fc(msops.flatten(x))


#: (C, H, W) of TinyCNN's input
TINY_INPUT = (1, 12, 12)


def tiny_network(seed: int = 0) -> nn.Cell:
    """A fresh TinyCNN (its weights are the shared initialisation's once the handle initialises it)."""
    return TinyCNN()


def relu_only() -> nn.Cell:
    return nn.SequentialCell([nn.ReLU()])


def bn_only() -> nn.Cell:
    return nn.SequentialCell([nn.BatchNorm2d(3), nn.ReLU()])


def _pair(v):
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return tuple(int(d) for d in v[-2:])


def prunable_modules(model: nn.Cell) -> dict:
    """``{name: facts}`` of every Conv2d / Dense, in model order, as the cells state them."""
    out = {}
    for name, c in model.cells_and_names():
        if isinstance(c, nn.Conv2d):
            out[name] = dict(kind="conv", weight_shape=tuple(c.weight.shape), has_bias=bool(c.has_bias),
                             in_channels=c.in_channels, out_channels=c.out_channels, groups=c.group,
                             kernel_size=_pair(c.kernel_size), stride=_pair(c.stride), numel=int(c.weight.size))
        elif isinstance(c, nn.Dense):
            out[name] = dict(kind="linear", weight_shape=tuple(c.weight.shape), has_bias=bool(c.has_bias),
                             in_channels=c.in_channels, out_channels=c.out_channels, numel=int(c.weight.size))
    return out


def hooks_left(model: nn.Cell) -> int:
    """Forward hooks still registered anywhere in the model."""
    return sum(len(getattr(c, "_forward_hook", None) or ()) + len(getattr(c, "_forward_pre_hook", None) or ())
               for _, c in model.cells_and_names())


def is_parameter(p) -> bool:
    """Whether ``p`` is the framework's trainable parameter type."""
    return isinstance(p, ms.Parameter) and p.requires_grad


# ---------------------------------------------------------------------------- optimizers
def optimizer_settings(optimizer) -> dict:
    """kind ("sgd" / "adam"), momentum, weight decay, and whether one setting covers every parameter."""
    if isinstance(optimizer, nn.SGD):
        # a grouped optimizer holds one weight decay per parameter
        decays = ({float(w.asnumpy()) for w in optimizer.weight_decay} if optimizer.is_group
                  else {optimizer.weight_decay})
        flags = optimizer.decay_flags
        return dict(kind="sgd", momentum=float(optimizer.momentum.asnumpy()),
                    weight_decay=decays.pop() if len(decays) == 1 else sorted(decays),
                    decays_every_parameter=all(flags) and len(flags) == len(optimizer.parameters),
                    parameters=len(optimizer.parameters))
    if isinstance(optimizer, Adam):
        return dict(kind="adam", momentum=None, weight_decay=optimizer.wd, decays_every_parameter=optimizer.wd > 0,
                    parameters=len(optimizer.parameters))
    return dict(kind=type(optimizer).__name__, parameters=len(optimizer.parameters))


def optimizer_state(optimizer, handle) -> dict:
    """``{layer: [state tensors shaped like its weight, as NumPy]}``."""
    state = optimizer_state_by_layer(optimizer, {l.name: handle.module(l.name).weight for l in handle.layers})
    return {n: [v.asnumpy() for v in values] for n, values in state.items()}


def learning_rate(optimizer) -> float:
    return float(optimizer.learning_rate.asnumpy())


def user_optimizer(model: nn.Cell):
    """An optimizer of the user's choice, not one prunekit builds (RMSProp with momentum)."""
    return nn.RMSProp(model.trainable_params(), learning_rate=1e-3, momentum=0.9, weight_decay=1e-4)


class PlainLoop:
    """A user's own training loop around a ``PruningSession``: MindSpore's functional
    ``value_and_grad`` (compiled), the session's gradient transform, the optimizer call."""

    def __init__(self, handle, optimizer):
        self.handle, self.optimizer = handle, optimizer
        net = handle.model

        def forward(x, y):
            return msops.cross_entropy(net(x), y)

        self._grad = ms.jit(ms.value_and_grad(forward, None, optimizer.parameters))
        position = {id(p): i for i, p in enumerate(optimizer.parameters)}
        self._index = {l.name: position[id(handle.module(l.name).weight)] for l in handle.layers}

    def step(self, session, x: np.ndarray, y: np.ndarray) -> dict:
        """One step; returns ``{layer: gradient the optimizer stepped with, as NumPy}``."""
        self.handle.model.set_train(True)
        session.before_step()
        loss, grads = self._grad(ms.Tensor(x), ms.Tensor(y))
        grads = session.transform_gradients(grads)
        if session.should_step():
            self.optimizer(grads)
        session.after_optimizer_step()
        self.loss = float(loss.asnumpy())
        return {n: grads[i].asnumpy() for n, i in self._index.items()}
