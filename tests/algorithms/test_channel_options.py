"""What Torch-Pruning users expect of the channel baseline (issue #11): a choice of channel
importance (prunekit/decisions/channel_importance.py), ignored_layers, maximum removal per
group or layer, round_to, explicitly named ratios, and the one-shot prunekit.prune_channels."""
import copy

import numpy as np
import pytest
import torch

import prunekit
from prunekit.algorithms import make_algorithm
from prunekit.algorithms.channel import MacModel, removal_limits
from prunekit.contract.backend import get_backend
from prunekit.decisions.channel_groups import find_channel_groups
from prunekit.decisions.channel_importance import IMPORTANCES, channel_importance
from prunekit.decisions.flops import count_model
from prunekit.errors import ConfigError, ModelError

TORCH = get_backend("torch")


@pytest.fixture(scope="module")
def resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.resnet18(num_classes=10)


@pytest.fixture
def h(resnet18):
    """torchvision's ResNet-18 at 32x32, a fresh copy per test: residual groups of several
    producers, BatchNorms."""
    return TORCH.wrap(copy.deepcopy(resnet18), (3, 32, 32), "resnet18")


def _prunable(groups):
    return [g for g in groups if g.prunable]


def test_importances_by_hand(h):
    groups = find_channel_groups(h)
    w, state = h.weights_numpy(), h.state_numpy()
    rng = np.random.default_rng(0)
    for g in _prunable(groups):  # BN scales of either sign, so |gamma| matters
        for nm in g.norms:
            state[f"{nm}.weight"] = rng.normal(size=g.size).astype(np.float32)
    g = next(x for x in groups if x.name == "layer2.0.conv1")
    rows = w["layer2.0.conv1"].reshape(g.size, -1).astype(np.float64)
    scores = {imp: channel_importance(groups, imp, w, state) for imp in ("l1", "l2", "bn_scale", "lamp")}
    np.testing.assert_allclose(scores["l1"][g.name], np.abs(rows).mean(1))
    np.testing.assert_allclose(scores["l2"][g.name], np.sqrt((rows ** 2).mean(1)))
    np.testing.assert_allclose(scores["bn_scale"][g.name],
                               np.mean([np.abs(state[f"{nm}.weight"]) for nm in g.norms], axis=0), rtol=1e-6)
    e = (rows ** 2).sum(1)
    lamp = np.array([e[i] / e[e >= e[i]].sum() for i in range(g.size)])
    np.testing.assert_allclose(scores["lamp"][g.name], lamp)
    for name, s in scores["lamp"].items():  # the best channel of every group scores 1
        assert s.max() == pytest.approx(1.0) and s.min() > 0
    # a residual group sums over its producers
    res = max(_prunable(groups), key=lambda x: len(x.producers))
    assert len(res.producers) > 1
    blocks = [w[p].reshape(res.size, -1).astype(np.float64) for p in res.producers]
    np.testing.assert_allclose(scores["l1"][res.name],
                               sum(np.abs(b).sum(1) for b in blocks) / sum(b.shape[1] for b in blocks))
    with pytest.raises(ConfigError, match="importance 'l3'.*allowed: l1, l2, bn_scale, taylor, lamp"):
        channel_importance(groups, "l3", w)
    with pytest.raises(ModelError, match="taylor"):
        channel_importance(groups, "taylor", w)


def test_bn_scale_refuses_a_group_without_a_scale():
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))  # the first conv has no norm
    with pytest.raises(ModelError, match="bn_scale.*group '0'"):
        prunekit.prune_channels(m, (3, 8, 8), importance="bn_scale")
    small = prunekit.prune_channels(m, (3, 8, 8), importance="bn_scale", ignored_layers=["0"], macs_kept=0.8)
    assert small[0].out_channels == 8 and small[2].out_channels < 8


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "lamp"])
def test_the_chosen_importance_decides(h, importance):
    rng = np.random.default_rng(1)
    state = h.state_numpy()
    for k in state:
        if (k.startswith("bn") or ".bn" in k or "downsample.1" in k) and k.endswith(".weight"):
            state[k] = rng.normal(size=state[k].shape).astype(np.float32)
    h.load_state_numpy(state)
    algo = make_algorithm("channel", importance=importance, allocation="uniform", macs_kept=0.5).bind(h, 1)
    algo.decide()
    scores = channel_importance(algo.groups, importance, h.weights_numpy(), h.state_numpy())
    pruned = 0
    for name, kept in algo.channel_keep.items():
        gone = np.setdiff1d(np.arange(scores[name].size), kept)
        if gone.size:
            pruned += 1
            assert scores[name][gone].max() <= scores[name][kept].min()
    assert pruned
    # the weights say so: removed producer rows are exactly zero, kept ones are not all zero
    for g in _prunable(algo.groups):
        gone = np.setdiff1d(np.arange(g.size), algo.channel_keep[g.name])
        for p in g.producers:
            rows = h.weights_numpy()[p].reshape(g.size, -1)
            assert not rows[gone].any()
            assert rows[algo.channel_keep[g.name]].any()


def test_taylor_decides_after_the_first_gradients(h):
    algo = make_algorithm("channel", importance="taylor", macs_kept=0.6)
    opt = torch.optim.SGD(h.model.parameters(), lr=0.0)  # lr 0: the weights the gradients were taken at stay
    session = TORCH.PruningSession(h, algo, opt, 3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    weights = {n: h.weight(n).clone() for n in algo.taylor.layers}
    session.before_step()
    assert not algo.channel_keep
    h.model.train()
    loss = torch.nn.functional.cross_entropy(h.model(x), y)
    opt.zero_grad()
    loss.backward()
    grads = {n: h.module(n).weight.grad.clone() for n in algo.taylor.layers}
    session.after_backward()
    opt.step()
    session.after_optimizer_step()
    assert algo.channel_keep  # decided after step 0
    taylor = {n: (weights[n] * grads[n]).abs().double().numpy() for n in weights}
    scores = channel_importance(algo.groups, "taylor", h.weights_numpy(), taylor=taylor)
    for name, kept in algo.channel_keep.items():
        gone = np.setdiff1d(np.arange(scores[name].size), kept)
        assert not gone.size or scores[name][gone].max() <= np.sort(scores[name])[-1]
    # globally, no removed channel beats a kept one of its own group
    for name, kept in algo.channel_keep.items():
        gone = np.setdiff1d(np.arange(scores[name].size), kept)
        if gone.size:
            assert scores[name][gone].max() <= scores[name][kept].min()
    macs = MacModel(h.layers, algo.groups)
    assert macs.macs({k: len(v) for k, v in algo.channel_keep.items()}) <= 0.6 * macs.macs({})
    state = algo.state_dict()
    assert state["taylor"]["batches"] == 1


def test_ignored_layers_and_max_removed(h):
    groups = find_channel_groups(h)
    algo = make_algorithm("channel", macs_kept=0.6, ignored_layers=["layer1"], max_removed=0.5).bind(h, 1)
    keep = algo.choose()
    for g in _prunable(groups):
        if any(p.startswith("layer1.") for p in g.producers):
            assert len(keep[g.name]) == g.size
        assert len(keep[g.name]) >= g.size - int(np.floor(0.5 * g.size))
    assert any(len(keep[g.name]) < g.size for g in _prunable(groups))
    per_layer = make_algorithm("channel", macs_kept=0.6, max_removed_by_layer={"layer3": 0.25}).bind(h, 1).choose()
    for g in _prunable(groups):
        if any(p.startswith("layer3.") for p in g.producers):
            assert len(per_layer[g.name]) >= g.size - int(np.floor(0.25 * g.size))
    limits = removal_limits(groups, ["conv1"], 1.0, {})
    stem = next(g for g in groups if "conv1" in g.producers)
    assert limits[stem.name] == stem.size
    # out of reach under the limits: refused, naming the goal
    with pytest.raises(ModelError, match="macs_kept=0.2 cannot be reached.*max_removed"):
        make_algorithm("channel", macs_kept=0.2, max_removed=0.3).bind(h, 1).choose()
    assert not make_algorithm("channel", macs_kept=0.2, max_removed=0.3).bind(h, 1).masks  # nothing applied
    with pytest.raises(ConfigError, match="ignored_layers: 'layer9'"):
        make_algorithm("channel", ignored_layers=["layer9"]).bind(h, 1)
    with pytest.raises(ConfigError, match="max_removed_by_layer: 'fc2'"):
        make_algorithm("channel", max_removed_by_layer={"fc2": 0.5}).bind(h, 1)


def test_ratio_names_say_what_they_mean(h):
    groups = find_channel_groups(h)
    total = sum(g.size for g in _prunable(groups))
    keep = make_algorithm("channel", channels_removed=0.25).bind(h, 1).choose()
    assert sum(len(v) for v in keep.values()) == total - int(round(0.25 * total))
    keep = make_algorithm("channel", macs_kept=0.4).bind(h, 1).choose()
    macs = MacModel(h.layers, groups)
    assert 0.38 <= macs.macs({k: len(v) for k, v in keep.items()}) / macs.macs({}) <= 0.4
    assert make_algorithm("channel").config.ratio == (0.5, "flops")
    assert make_algorithm("channel", keep_ratio=0.7, target="channels").config.ratio == (0.7, "channels")
    bad = [({"macs_kept": 0.5, "channels_removed": 0.5}, "give one of macs_kept, channels_removed"),
           ({"macs_kept": 0.5, "keep_ratio": 0.5}, "keep_ratio"),
           ({"macs_kept": 1.5}, r"macs_kept must be a number in \(0, 1\], got 1.5"),
           ({"channels_removed": 1.0}, r"channels_removed must be a number in \[0, 1\), got 1.0"),
           ({"max_removed": -0.1}, "max_removed must be"),
           ({"max_removed_by_layer": {"layer1": 2}}, r"max_removed_by_layer\['layer1'\]"),
           ({"importance": "fisher"}, "importance 'fisher'"),
           ({"ignored_layers": [3]}, "ignored_layers"),
           ({"macs_kept": "half"}, "channel setting 'macs_kept' must be a number")]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message):
            make_algorithm("channel", **settings)


def test_one_shot_prune_a_torchvision_model(resnet18):
    model = resnet18
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = prunekit.prune_channels(model, input_shape=(3, 32, 32), macs_kept=0.5, round_to=8)
    for k, v in model.state_dict().items():  # the user's model is as it was
        assert torch.equal(v, before[k])
    dense, pruned = TORCH.wrap(model, (3, 32, 32)), TORCH.wrap(small, (3, 32, 32))
    macs = [count_model(x.layers, x.weights_numpy(), x.state_numpy())["dense_macs"] for x in (dense, pruned)]
    assert 0.45 <= macs[1] / macs[0] <= 0.5
    widths = [l.out_channels for l in pruned.layers if l.kind == "conv"]
    assert all(c % 8 == 0 for c in widths)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="one-shot"):
        prunekit.prune_channels(model, (3, 32, 32), importance="taylor")
    with pytest.raises(ConfigError, match="macs_kept"):
        prunekit.prune_channels(model, (3, 32, 32), macs_kept=0)
    with pytest.raises(ModelError, match="no registered backend"):
        prunekit.prune_channels(object(), (3, 32, 32))
    assert set(IMPORTANCES) == {"l1", "l2", "bn_scale", "taylor", "lamp"}


def test_one_shot_finds_the_backend_that_owns_the_model():
    import mindspore.nn as msnn
    import torch.nn as tnn

    from prunekit.app.oneshot import backend_for_model

    assert backend_for_model(tnn.Conv2d(3, 4, 3)) == "torch"
    assert backend_for_model(msnn.Conv2d(3, 4, 3)) == "mindspore"
    with pytest.raises(ModelError, match="no registered backend"):
        backend_for_model(object())
