"""Both backends alike on the structures of issue #11: a tiny network with a squeeze-excite gate,
a concatenation and a GroupNorm gets the same channel groups on each backend and compacts to a
model equal to its masked model (the compaction's own check); a PruningSession's state_dict
round-trips through load_state_dict (masks, step, masked weights) on each backend."""
import numpy as np
import pytest

from backend_helpers import kit_for, random_batches, tiny_handle
from prunekit.algorithms.registry import make_algorithm
from prunekit.decisions.channel_groups import find_channel_groups, fit_keep
from prunekit.errors import ConfigError

SHAPE = (3, 8, 8)


def _torch_net():
    import torch
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.squeeze = nn.Conv2d(8, 4, 1)
            self.excite = nn.Conv2d(4, 8, 1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.gn = nn.GroupNorm(6, 12)
            self.c = nn.Conv2d(12, 6, 1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            y = torch.relu(self.bn(self.a(x)))
            y = y * torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
            y = torch.relu(self.gn(torch.cat([y, self.b(x)], 1)))
            return self.fc(torch.relu(self.c(y)).mean((2, 3)))
    return Net()


def _mindspore_net():
    import mindspore.nn as nn
    import mindspore.ops as ops

    def conv(i, o, k):
        return nn.Conv2d(i, o, k, pad_mode="pad", padding=k // 2, has_bias=True)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.a = conv(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.squeeze = conv(8, 4, 1)
            self.excite = conv(4, 8, 1)
            self.b = conv(3, 4, 3)
            self.gn = nn.GroupNorm(6, 12)
            self.c = conv(12, 6, 1)
            self.fc = nn.Dense(6, 2)

        def construct(self, x):
            y = ops.relu(self.bn(self.a(x)))
            y = y * ops.sigmoid(self.excite(ops.relu(self.squeeze(y.mean(axis=(2, 3), keep_dims=True)))))
            y = ops.relu(self.gn(ops.cat((y, self.b(x)), 1)))
            return self.fc(ops.relu(self.c(y)).mean(axis=(2, 3)))
    return Net()


def _groups_and_compact(backend):
    net = _torch_net() if backend.name == "torch" else _mindspore_net()
    handle = backend.wrap(net, SHAPE, "structures")
    rng = np.random.default_rng(0)
    handle.load_state_numpy({k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) if k.endswith("running_var")
                             else rng.normal(0, 0.5, v.shape).astype(np.float32)
                             for k, v in handle.state_numpy().items()})
    groups = find_channel_groups(handle)
    keep = {g.name: fit_keep(g, np.arange(g.size, dtype=float), g.size // 2) for g in groups if g.prunable}
    small = backend.compact(handle, keep)  # refused with ModelError if it differed from the masked model
    return [g.to_dict() for g in groups], {l.name: tuple(l.weight_shape) for l in small.layers}


def test_structure_groups_and_compaction_alike_on_both_backends(backend):
    groups, shapes = _groups_and_compact(backend)
    by = {g["name"]: g for g in groups}
    assert by["a"]["producers"] == ["a", "excite"] and by["a"]["in_offsets"] == {"gn": 0, "c": 0}
    assert by["b"]["in_offsets"] == {"gn": 8, "c": 8} and by["a"]["whole"] == 2 and by["b"]["whole"] == 2
    assert by["squeeze"]["prunable"] and by["squeeze"]["consumers"] == ["excite"]
    assert shapes["excite"][0] == 4 and shapes["c"][1] == 6 and shapes["b"][0] == 2
    if backend.name != "torch":
        from prunekit.contract.backend import get_backend
        ref_groups, ref_shapes = _groups_and_compact(get_backend("torch"))
        assert groups == ref_groups and shapes == ref_shapes


def test_session_state_round_trips(backend):
    kit = kit_for(backend)
    algo = lambda: make_algorithm("magnitude", sparsity=0.5, frequency=1, end_fraction=0.5)  # noqa: E731
    handle = tiny_handle(backend, kit, seed=0)
    optimizer = kit.user_optimizer(handle.model)
    session = backend.PruningSession(handle, algo(), optimizer, 4)
    loop = kit.PlainLoop(handle, optimizer)
    for x, y in random_batches(kit, 2):
        loop.step(session, x, y)
    state = session.state_dict()
    fresh = tiny_handle(backend, kit, seed=0)
    other = backend.PruningSession(fresh, algo(), kit.user_optimizer(fresh.model), 4)
    with pytest.raises(ConfigError, match="step"):
        other.load_state_dict({"algorithm": None})
    other.load_state_dict(state)
    assert other.step == session.step == 2
    masks = {k: np.asarray(v) for k, v in state["algorithm"]["masks"].items()}
    assert masks and any((m == 0).any() for m in masks.values())
    weights = fresh.weights_numpy()
    for name, m in masks.items():
        assert np.all(weights[name][m == 0] == 0)
        assert np.array_equal(fresh.ops.to_numpy(other.algorithm.masks[name]), m)
