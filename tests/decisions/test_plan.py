"""Pruning plans: file round trip, damaged files, and refusal of plans made for another model."""
import json
import os

import numpy as np
import pytest

from prunekit.algorithms import apply_plan, make_algorithm
from prunekit.errors import PlanError
from prunekit.contract.layers import LayerInfo, signature
from prunekit.decisions.plan import PruningPlan

torch = pytest.importorskip("torch")
from prunekit.backends.torch import model_handle  # noqa: E402


def _layer(name, shape, kind="conv"):
    return LayerInfo(name, kind, tuple(shape), shape[1], shape[0])


def _sample_plan(rng):
    layers = [_layer("conv1", (8, 3, 3, 3)), _layer("block.0.conv", (16, 8, 1, 1)), _layer("fc", (10, 16), "linear")]
    return PruningPlan(
        model="toy", algorithm="magnitude", backend="torch",
        layer_signature=signature(layers),
        masks={l.name: rng.random(l.weight_shape) < 0.3 for l in layers},
        ranks={"conv1": 3, "block.0.conv": 7},
        keep_ratios={"conv1": 0.5, "fc": 0.125},
        kept_channels={"conv1": [0, 2, 5, 7], "block.0.conv": [1]},
        meta={"target_sparsity": 0.7, "note": "x"},
    ), layers


def _files(d):
    return sorted(os.listdir(d))


def test_round_trip(tmp_path):
    plan, layers = _sample_plan(np.random.default_rng(0))
    json_path, npz_path = plan.save(str(tmp_path / "sub" / "plan"))
    assert json_path.endswith("plan.json") and npz_path.endswith("plan.npz")
    assert _files(tmp_path / "sub") == ["plan.json", "plan.npz"]   # no temporary files left over
    for path in (str(tmp_path / "sub" / "plan"), json_path):       # with or without ".json"
        back = PruningPlan.load(path)
        assert (back.model, back.algorithm, back.backend) == ("toy", "magnitude", "torch")
        assert back.layer_signature == signature(layers)
        assert all(isinstance(d, int) for _, s in back.layer_signature for d in s)
        assert sorted(back.masks) == sorted(plan.masks)
        for name, m in plan.masks.items():
            assert back.masks[name].dtype == np.bool_
            np.testing.assert_array_equal(back.masks[name], m)
        assert back.ranks == plan.ranks and all(type(v) is int for v in back.ranks.values())
        assert back.keep_ratios == plan.keep_ratios
        assert back.kept_channels == plan.kept_channels
        assert back.meta == plan.meta
        back.check_matches(layers)  # a plan matches the layers it was made for


def test_float_masks_are_stored_as_booleans(tmp_path):
    plan = PruningPlan(model="m", masks={"a": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)})
    plan.save(str(tmp_path / "p"))
    back = PruningPlan.load(str(tmp_path / "p"))
    assert back.masks["a"].dtype == np.bool_
    np.testing.assert_array_equal(back.masks["a"], [[True, False], [False, True]])


def _assert_load_fails(path, directory, needle=None):
    before = {f: os.path.getmtime(os.path.join(directory, f)) for f in os.listdir(directory)}
    with pytest.raises(PlanError) as info:
        PruningPlan.load(path)
    after = {f: os.path.getmtime(os.path.join(directory, f)) for f in os.listdir(directory)}
    assert after == before  # nothing written, nothing removed
    if needle:
        assert needle in str(info.value)


def test_load_missing_and_damaged_files(tmp_path):
    plan, _ = _sample_plan(np.random.default_rng(1))
    json_path, npz_path = plan.save(str(tmp_path / "good"))
    base = str(tmp_path / "good")

    _assert_load_fails(str(tmp_path / "nothing"), tmp_path, "nothing")   # no json at all

    text = open(json_path).read()
    cases = {
        "truncated": text[: len(text) // 2],
        "notjson": "\x00\x01 this is not json",
        "list": "[1, 2, 3]",
        "wrongformat": json.dumps({"format": "someone-else/3"}),
        "badranks": json.dumps({"format": "prunekit-plan/1", "ranks": {"conv1": "many"}}),
        "badsignature": json.dumps({"format": "prunekit-plan/1", "layer_signature": 5}),
    }
    for name, content in cases.items():
        with open(tmp_path / f"{name}.json", "w") as f:
            f.write(content)
        _assert_load_fails(str(tmp_path / name), tmp_path)

    # json fine, npz missing
    os.rename(npz_path, str(tmp_path / "moved.npz"))
    _assert_load_fails(base, tmp_path, ".npz")
    # npz damaged
    with open(npz_path, "wb") as f:
        f.write(b"PK\x03\x04 definitely not a zip archive")
    _assert_load_fails(base, tmp_path, ".npz")
    # npz truncated
    good = open(str(tmp_path / "moved.npz"), "rb").read()
    with open(npz_path, "wb") as f:
        f.write(good[: len(good) // 2])
    _assert_load_fails(base, tmp_path)
    # npz valid but lacking one of the masks the json names
    masks = dict(plan.masks)
    masks.pop("fc")
    np.savez(str(tmp_path / "partial.npz"), **masks)
    os.replace(str(tmp_path / "partial.npz"), npz_path)
    _assert_load_fails(base, tmp_path, "fc")


def test_check_matches_names_the_layer():
    _, layers = _sample_plan(np.random.default_rng(2))
    plan = PruningPlan(layer_signature=signature(layers))
    other = [layers[0], _layer("block.0.conv", (16, 8, 3, 3)), layers[2]]   # one layer with another shape
    with pytest.raises(PlanError, match="block.0.conv"):
        plan.check_matches(other)
    with pytest.raises(PlanError, match="fc"):
        plan.check_matches(layers[:2])                                      # layer missing from the model
    with pytest.raises(PlanError, match="extra"):
        plan.check_matches(layers + [_layer("extra", (4, 4), "linear")])    # model has a layer the plan lacks
    masked = PruningPlan(masks={"fc": np.ones((10, 15), bool)})             # no signature, bad mask shape
    with pytest.raises(PlanError, match="fc"):
        masked.check_matches(layers)
    with pytest.raises(PlanError, match="ghost"):
        PruningPlan(masks={"ghost": np.ones(3, bool)}).check_matches(layers)


def _zeroing_plan(handle, model=None):
    """A plan whose masks prune everything: applying any part of it would be visible."""
    return PruningPlan(model=handle.model_name if model is None else model, layer_signature=signature(handle.layers),
                       masks={l.name: np.zeros(l.weight_shape, bool) for l in handle.layers})


def _assert_state_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resnet32_plan_refused_by_resnet20_without_change():
    r20 = model_handle("resnet20", seed=0)
    r32 = model_handle("resnet32", seed=0)
    before = r20.state_numpy()

    with pytest.raises(PlanError, match="resnet32"):
        apply_plan(r20, _zeroing_plan(r32))
    _assert_state_equal(r20.state_numpy(), before)

    # same model name recorded: the check must then name a layer resnet20 does not have
    only_in_32 = {l.name for l in r32.layers} - {l.name for l in r20.layers}
    assert only_in_32
    plan = _zeroing_plan(r32, model="")
    with pytest.raises(PlanError) as info:
        plan.check_matches(r20.layers, "resnet20")
    assert any(repr(n) in str(info.value) for n in only_in_32), str(info.value)
    with pytest.raises(PlanError):
        apply_plan(r20, plan)
    _assert_state_equal(r20.state_numpy(), before)


def test_plan_with_other_last_layer_shape_refused_without_change():
    src = model_handle("resnet20", num_classes=10, seed=0)
    dst = model_handle("resnet20", num_classes=100, seed=0)   # only fc differs: the last layer checked
    before = dst.state_numpy()
    with pytest.raises(PlanError, match="'fc'"):
        apply_plan(dst, _zeroing_plan(src))
    _assert_state_equal(dst.state_numpy(), before)


def test_matching_plan_applies_exactly(tmp_path):
    h = model_handle("resnet20", seed=3)
    rng = np.random.default_rng(4)
    plan = PruningPlan(model="resnet20", layer_signature=signature(h.layers),
                       masks={l.name: rng.random(l.weight_shape) < 0.5 for l in h.layers[::3]})
    plan.save(str(tmp_path / "p"))
    before = h.state_numpy()
    apply_plan(h, PruningPlan.load(str(tmp_path / "p")))
    after = h.state_numpy()
    for k in before:
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        expected = before[k] * plan.masks[layer] if layer in plan.masks else before[k]
        np.testing.assert_array_equal(after[k], expected, err_msg=k)


def test_algorithm_plan_replays_on_fresh_model(tmp_path):
    """A magnitude plan saved from one model, replayed on a fresh build, gives the same weights."""
    h = model_handle("mnist_cnn", in_channels=1, image_size=28, seed=5)
    alg = make_algorithm("magnitude", sparsity=0.8, schedule="oneshot").bind(h, total_steps=1)
    alg.before_step(0)
    plan = alg.plan()
    assert all(m.dtype == np.bool_ for m in plan.masks.values())
    plan.save(str(tmp_path / "mag"))
    fresh = model_handle("mnist_cnn", in_channels=1, image_size=28, seed=5)
    apply_plan(fresh, PruningPlan.load(str(tmp_path / "mag")))
    _assert_state_equal(fresh.state_numpy(), h.state_numpy())
