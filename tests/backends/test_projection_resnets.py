"""The projection-shortcut CIFAR ResNets (``resnet20b``; prunekit/contract/reference_models.py,
backends/*/models.py): each stage's residual stream is one prunable channel group (its producers
the stem or the projection conv and every block's second conv), unlike the option-A ``resnet20``;
compaction of every group, streams included, computes what the masked model computes; the channel
baseline and DSA allocate channels to the streams.

Run on PyTorch; the conformance cases ``decisions/*/resnet20b`` (conformance/cases/resnet_b.py)
prove MindSpore finds the same groups (bitwise), compacts to the same shapes and logits and
allocates the same channels.
"""
import numpy as np
import pytest

from prunekit.contract.backend import get_backend

from prunekit.decisions.channel_groups import find_channel_groups, masked_state
from prunekit.decisions.flops import count_model

ATOL = 1e-4
STREAMS = {  # group name -> producers (the residual stream of each stage)
    "conv1": {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"},
    "layer2.0.conv2": {"layer2.0.shortcut.0", "layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"},
    "layer3.0.conv2": {"layer3.0.shortcut.0", "layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"},
}


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("torch")
    return get_backend("torch")


def randomised(backend, seed=0):
    h = backend.model_handle("resnet20b", 10, 3, 32, seed=seed)
    rng = np.random.default_rng(seed)
    st = h.state_numpy()
    for k, v in st.items():
        if k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            st[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith("running_mean") or (k.endswith(".bias") and k[:-5] + ".running_mean" in st):
            st[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
    h.load_state_numpy(st)
    return h


def test_residual_streams_are_prunable_groups(backend):
    groups = {g.name: g for g in find_channel_groups(backend.model_handle("resnet20b", seed=0))}
    for name, producers in STREAMS.items():
        g = groups[name]
        assert g.prunable and set(g.producers) == producers, name
        assert len(g.norms) == len(producers)                      # each producer's BatchNorm, shortcut BN included
    assert {"layer2.0.conv1", "layer2.0.shortcut.0"} <= set(groups["conv1"].consumers)
    assert {"layer3.0.conv1", "layer3.0.shortcut.0"} <= set(groups["layer2.0.conv2"].consumers)
    assert "fc" in groups["layer3.0.conv2"].consumers
    # the option-A twin's streams are coupled by the zero-padding shortcuts: not prunable
    option_a = {g.name: g for g in find_channel_groups(backend.model_handle("resnet20", seed=0))}
    assert not any(option_a[n].prunable for n in STREAMS)


def test_compaction_of_every_group_is_exact(backend):
    h = randomised(backend)
    groups = find_channel_groups(h)
    rng = np.random.default_rng(3)
    keep = {g.name: np.sort(rng.choice(g.size, g.size // 2, replace=False)) for g in groups if g.prunable}
    assert set(STREAMS) <= set(keep)
    before = h.state_numpy()
    small = backend.compact(h, keep)
    masked = backend.model_handle("resnet20b", 10, 3, 32, seed=0)
    masked.load_state_numpy(masked_state(before, groups, keep))
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref, out = masked.predict(x), small.predict(x)
    assert np.abs(ref).max() > 1e-2
    assert float(np.abs(ref - out).max()) <= ATOL
    shapes = {l.name: l.weight_shape for l in small.layers}
    assert shapes["layer2.0.shortcut.0"] == (16, 8, 1, 1) and shapes["layer3.0.shortcut.0"] == (32, 16, 1, 1)
    assert shapes["fc"] == (10, 32)
    assert all(np.array_equal(before[k], v) for k, v in h.state_numpy().items())  # the original untouched


def test_channel_baseline_and_dsa_allocate_the_streams(backend):
    from prunekit.algorithms.channel import choose_channels
    from prunekit.algorithms.dsa import DSAConfig, DSAPruner

    h = randomised(backend, seed=1)
    groups = find_channel_groups(h)
    keep = choose_channels(h.layers, groups, h.weights_numpy(), 0.5, "flops", allocation="uniform")
    assert all(0 < len(keep[n]) < g.size for n, g in ((g.name, g) for g in groups) if n in STREAMS)
    small = backend.compact(h, keep)
    c0 = count_model(h.layers, h.weights_numpy(), h.state_numpy())["dense_macs"]
    c1 = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
    assert 0.4 <= c1 / c0 <= 0.5
    algo = DSAPruner(DSAConfig(budget=0.5, seed=7)).bind(h, 10)
    try:
        names = [g.name for g in algo.groups]
        assert set(STREAMS) <= set(names)
        algo.finish()
        counts = dict(zip(names, algo.final_counts))
        assert all(counts[n] < g.size for n, g in ((g.name, g) for g in algo.groups) if n in STREAMS)
    finally:
        algo.gates.remove()
