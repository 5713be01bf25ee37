"""Physical compaction (backend.compact): the narrower dense model computes what the masked
model computes, its parameters and FLOPs are measured on its new layers, the original model is
untouched, plans replay it, and bad input is refused with nothing changed."""
import numpy as np
import pytest

from prunekit.contract.backend import get_backend
from prunekit.decisions.channel_groups import compact_with_plan, find_channel_groups, masked_state
from prunekit.errors import ModelError, PlanError
from prunekit.decisions.flops import count_model
from prunekit.contract.layers import signature
from prunekit.decisions.plan import PruningPlan

ATOL = 1e-4


def _randomise_bn(handle, seed=0):
    """Give BatchNorms non-trivial statistics, so outputs are O(1) and every channel matters."""
    rng = np.random.default_rng(seed)
    st = handle.state_numpy()
    for k, v in st.items():
        if k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            st[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith("running_mean") or (k.endswith(".bias") and k[:-5] + ".running_mean" in st):
            st[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
    handle.load_state_numpy(st)


def _half_keep(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {g.name: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False)) for g in groups if g.prunable}


def _check_equivalence(handle, rebuild):
    groups = find_channel_groups(handle)
    keep = _half_keep(groups)
    before = handle.state_numpy()
    small = handle_compact(handle, keep)
    after = handle.state_numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before), "compact changed the original model"
    masked = rebuild()
    masked.load_state_numpy(masked_state(before, groups, keep))
    x = np.random.default_rng(1).standard_normal((4,) + tuple(handle.input_shape)).astype(np.float32)
    ref, out = masked.predict(x), small.predict(x)
    assert np.abs(ref).max() > 1e-2  # outputs that can show a wrong slice
    assert np.abs(ref - out).max() <= ATOL
    # counts come from the new layers: every producer has exactly the kept rows
    by_layer = {l.name: l for l in small.layers}
    for g in groups:
        if g.name in keep:
            for p in g.producers:
                assert by_layer[p].out_channels == len(keep[g.name])
    c0 = count_model(handle.layers, handle.weights_numpy(), handle.state_numpy())
    c1 = count_model(small.layers, small.weights_numpy(), small.state_numpy())
    assert c1["dense_macs"] < c0["dense_macs"] and c1["total_params"] < c0["total_params"]
    assert c1["dense_macs"] == sum(int(np.prod(l.weight_shape)) * l.macs_per_weight for l in small.layers)
    return small


def handle_compact(handle, keep):
    return get_backend(handle.ops.name).compact(handle, keep)


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2", "vgg16"])
def test_compacted_equals_masked(backend, model):
    def build():
        h = backend.model_handle(model, 10, 3, 32, seed=0)
        return h
    h = build()
    _randomise_bn(h)
    _check_equivalence(h, build)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_compacted_equals_masked_torchvision(name):
    tv = pytest.importorskip("torchvision")
    import torch
    from prunekit.backends.torch.layers import TorchModelHandle

    def build():
        torch.manual_seed(0)
        return TorchModelHandle(getattr(tv.models, name)(num_classes=10), (3, 32, 32), name)
    h = build()
    _randomise_bn(h)
    _check_equivalence(h, build)


def test_mnist_flatten_columns_and_plan_roundtrip(backend, tmp_path):
    h = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    groups = find_channel_groups(h)
    keep = {"conv2": [0, 5, 9, 63], "fc1": list(range(0, 128, 2))}
    small = backend.compact(h, keep)
    w = dict(small.weights_numpy())
    assert w["fc1"].shape == (64, 4 * 49) and w["conv2"].shape == (4, 32, 5, 5) and w["fc2"].shape == (10, 64)
    full = h.weights_numpy()["fc1"]
    cols = np.concatenate([np.arange(c * 49, (c + 1) * 49) for c in keep["conv2"]])
    assert np.array_equal(w["fc1"], full[::2][:, cols])
    plan = PruningPlan(model=h.model_name, algorithm="channel", backend=backend.name,
                       layer_signature=signature(h.layers), kept_channels=keep)
    plan.save(str(tmp_path / "plan"))
    fresh = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    again = compact_with_plan(fresh, PruningPlan.load(str(tmp_path / "plan")))
    x = np.random.default_rng(2).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert np.array_equal(again.predict(x), small.predict(x))
    other = backend.model_handle("resnet20", 10, 3, 32, seed=0)
    with pytest.raises(PlanError, match="resnet20|mnist_cnn"):
        compact_with_plan(other, plan)
    assert groups == find_channel_groups(h)


def test_bad_keep_is_refused_and_nothing_changes(backend):
    h = backend.model_handle("resnet20", 10, 3, 32, seed=0)
    before = h.state_numpy()
    layers = list(h.layers)
    cases = [({"nope": [0]}, "unknown channel group 'nope'"),
             ({"layer1.0.conv1": []}, "would keep no channel"),
             ({"layer1.0.conv1": [0, 16]}, "index 16 is out of range"),
             ({"layer1.0.conv1": [-1]}, "out of range"),
             ({"layer1.0.conv1": [1, 1]}, "repeat"),
             ({"layer1.0.conv1": [0.5]}, "must be integers"),
             ({"fc": [0, 1]}, "not prunable"),
             ({"conv1": [0]}, "not prunable")]
    for keep, msg in cases:
        with pytest.raises(ModelError, match=msg):
            backend.compact(h, keep)
    after = h.state_numpy()
    assert h.layers == layers and all(np.array_equal(before[k], after[k]) for k in before)
    # keeping a whole non-prunable group is allowed (a no-op for it)
    same = backend.compact(h, {"fc": list(range(10))})
    assert signature(same.layers) == signature(h.layers)


def test_time_inference_side_by_side(backend):
    """The timer the job and the compaction benchmark use: every model timed rounds x repeats
    times, in turn, and left in the mode it was in."""
    h = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    small = backend.compact(h, {"conv2": list(range(0, 64, 4))})
    h.model.set_train(True) if hasattr(h.model, "set_train") else h.model.train()
    got = backend.time_inference([h, small], 8, warmup=1, repeats=2, rounds=2)
    assert [t["timed"] for t in got] == [4, 4]
    assert all(0 < t["min_ms"] <= t["median_ms"] for t in got)
    assert bool(h.model.training)
    with pytest.raises(ValueError, match="deploy"):
        backend.time_inference([h], 8, deploy="turbo")


@pytest.mark.parametrize("deploy", ["frozen", "compiled"])
def test_torch_deployed_timing(deploy):
    backend = get_backend("torch")
    h = backend.model_handle("mnist_cnn", 10, 1, 28, seed=0)
    [t] = backend.time_inference([h], 4, warmup=1, repeats=2, deploy=deploy)
    assert t["deploy"] == deploy and t["timed"] == 2 and t["median_ms"] > 0
    assert h.model.training  # restored


def test_time_side_by_side_interleaves_rounds():
    from prunekit.app.timing import time_side_by_side
    order = []
    calls = [lambda: order.append("a"), lambda: (order.append("b"), __import__("time").sleep(0.003))]
    got = time_side_by_side(calls, warmup=1, repeats=2, rounds=2)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-up each, then every model in turn per round
    assert [t["timed"] for t in got] == [4, 4]
    assert got[1]["min_ms"] >= 3.0 > got[0]["median_ms"]
