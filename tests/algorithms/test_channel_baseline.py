"""The neutral channel baseline (algorithm "channel"): group-aware L1 filter pruning to a FLOPs or
channel ratio, masks that make the masked model compute what the compacted model computes, and
the job's compaction step (measured params/FLOPs before and after, plan with kept channels)."""
import json

import numpy as np
import pytest

from prunekit.algorithms import make_algorithm
from prunekit.algorithms.channel import ChannelConfig, MacModel, choose_channels, group_scores
from prunekit.contract.backend import get_backend
from prunekit.decisions.channel_groups import compact_with_plan, find_channel_groups
from prunekit.errors import ConfigError, ModelError
from prunekit.decisions.flops import count_model
from prunekit.app.job import RunConfig, run
from prunekit.decisions.plan import PruningPlan


def _handle(backend_name, model="resnet20"):
    return get_backend(backend_name).model_handle(model, 10, 3, 32, seed=0)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_flops_target_met_on_the_compacted_model(ratio):
    h = _handle("torch")
    groups = find_channel_groups(h)
    keep = choose_channels(h.layers, groups, h.weights_numpy(), ratio, "flops")
    assert set(keep) == {g.name for g in groups if g.prunable}
    assert all(len(v) >= 1 for v in keep.values())
    small = get_backend("torch").compact(h, keep)
    dense = count_model(h.layers, h.weights_numpy(), h.state_numpy())["dense_macs"]
    got = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
    assert MacModel(h.layers, groups).macs({k: len(v) for k, v in keep.items()}) == got
    # met, and not overshot by more than one channel's worth of the largest group
    assert ratio - 0.02 <= got / dense <= ratio


def test_round_to_keeps_multiples():
    h = _handle("torch", "mobilenetv2")
    groups = find_channel_groups(h)
    keep = choose_channels(h.layers, groups, h.weights_numpy(), 0.5, "flops", round_to=8)
    sizes = {g.name: g.size for g in groups}
    assert all(len(v) % 8 == 0 or len(v) == sizes[k] for k, v in keep.items())
    assert any(len(v) < sizes[k] for k, v in keep.items())
    macs = MacModel(h.layers, groups)
    assert macs.macs({k: len(v) for k, v in keep.items()}) <= 0.5 * macs.macs({})
    with pytest.raises(ConfigError, match="round_to"):
        ChannelConfig(round_to=0)
    r20 = _handle("torch")  # internal groups of 16 keep >= 8: a quarter of the MACs is out of reach
    with pytest.raises(ModelError, match="cannot be reached with round_to=8"):
        choose_channels(r20.layers, find_channel_groups(r20), r20.weights_numpy(), 0.25, "flops", round_to=8)


@pytest.mark.parametrize("model,round_to", [("vgg16", 8), ("resnet20", 1), ("mobilenetv2", 16)])
def test_uniform_allocation_same_fraction_everywhere(model, round_to):
    h = _handle("torch", model)
    groups = find_channel_groups(h)
    w = h.weights_numpy()
    keep = choose_channels(h.layers, groups, w, 0.5, "flops", round_to=round_to, allocation="uniform")
    sizes = {g.name: g.size for g in groups if g.prunable}
    counts = {k: len(v) for k, v in keep.items()}
    macs = MacModel(h.layers, groups)
    assert macs.macs(counts) <= 0.5 * macs.macs({})
    # one fraction f for all: each count is f * size rounded up to the multiple (>= one unit)
    f = max((counts[n] - round_to) / sizes[n] for n in sizes)
    for n, size in sizes.items():
        assert counts[n] % round_to == 0 or counts[n] == size
        assert counts[n] >= min(round_to, size)
        assert counts[n] >= min(size, f * size - 1e-9)
        assert counts[n] <= max(min(round_to, size), f * size + round_to)
    # within a group the best group-L1 channels stay
    scores = group_scores(groups, w)
    for n, kept in keep.items():
        gone = np.setdiff1d(np.arange(sizes[n]), kept)
        if gone.size:
            assert scores[n][gone].max() <= scores[n][kept].min()
    # the largest such fraction: one more unit everywhere it can grow breaks the budget
    bigger = {n: min(sizes[n], c + round_to) for n, c in counts.items()}
    assert macs.macs(bigger) > 0.5 * macs.macs({})
    with pytest.raises(ConfigError, match="allocation"):
        ChannelConfig(allocation="layerwise")
    with pytest.raises(ModelError, match="allocation=uniform"):
        choose_channels(h.layers, groups, w, 1e-4, "flops", round_to=round_to, allocation="uniform")


def test_uniform_allocation_in_the_job(tmp_path):
    algo = make_algorithm("channel", keep_ratio=0.5, allocation="uniform", round_to=8)
    h = _handle("torch", "vgg16")
    algo.bind(h, 1)
    algo.finish()
    kept = [len(v) for v in algo.channel_keep.values()]
    assert algo.describe()["allocation"] == "uniform"
    assert min(kept) >= 8 and all(k % 8 == 0 for k in kept)


def test_lowest_l1_channels_go_first_and_channel_target():
    h = _handle("torch")
    groups = find_channel_groups(h)
    w = h.weights_numpy()
    keep = choose_channels(h.layers, groups, w, 0.5, "channels")
    total = sum(g.size for g in groups if g.prunable)
    assert sum(len(v) for v in keep.values()) == total // 2
    g = next(x for x in groups if x.name == "layer1.0.conv1")
    score = np.abs(w["layer1.0.conv1"]).reshape(16, -1).mean(axis=1)
    gone = np.setdiff1d(np.arange(16), keep[g.name])
    if len(gone) and len(keep[g.name]):
        assert score[gone].max() <= score[keep[g.name]].min()
    with pytest.raises(ConfigError, match="keep_ratio"):
        ChannelConfig(keep_ratio=0.0)
    with pytest.raises(ConfigError, match="target"):
        ChannelConfig(target="params")


def test_same_choice_on_both_backends_and_masked_equals_compacted():
    try:
        ms = _handle("mindspore", "mobilenetv2")
    except Exception as e:  # pragma: no cover
        pytest.skip(f"mindspore unavailable: {e}")
    th = _handle("torch", "mobilenetv2")
    rng = np.random.default_rng(0)
    st = th.state_numpy()
    for k, v in st.items():  # non-zero BN shifts: removed channels must not leak through them
        if v.ndim == 1:
            st[k] = (rng.uniform(0.5, 1.5, v.shape) if k.endswith(("weight", "running_var"))
                     else rng.normal(0, 0.2, v.shape)).astype(np.float32)
    th.load_state_numpy(st)
    ms.load_state_numpy(st)
    algs = []
    for h in (th, ms):
        a = make_algorithm("channel", keep_ratio=0.4).bind(h, total_steps=1)
        a.before_step(0)
        algs.append(a)
    assert algs[0].channel_keep.keys() == algs[1].channel_keep.keys()
    assert all(np.array_equal(algs[0].channel_keep[k], algs[1].channel_keep[k]) for k in algs[0].channel_keep)
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    masked = th.predict(x)  # the algorithm has applied its masks to th
    small = get_backend("torch").compact(th, algs[0].channel_keep)
    assert np.abs(masked).max() > 1e-2 and np.abs(masked - small.predict(x)).max() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_job_compacts_and_reports(backend, tmp_path):
    out = tmp_path / "run"
    report = run(RunConfig(backend=backend, model="resnet20", dataset="cifar10", algorithm="channel",
                           params={"keep_ratio": 0.5}, train_limit=100, test_limit=50, dense_epochs=0,
                           prune_epochs=1, batch_size=50, progress=False, out=str(out)), echo=lambda *a: None)
    comp = report["compaction"]
    assert comp["macs_after"] == report["totals"]["dense_macs"] < comp["macs_before"]
    assert comp["params_after"] == report["totals"]["total_params"] < comp["params_before"]
    assert comp["macs_after"] <= 0.5 * comp["macs_before"]
    assert abs(report["accuracy"]["after_compaction"] - report["accuracy"]["after_pruning"]) <= 0.02
    plan = PruningPlan.load(str(out / "plan"))
    assert {k: len(v) for k, v in plan.kept_channels.items()} == {k: v["kept"] for k, v in comp["groups"].items()}
    weights = np.load(out / "weights.npz")
    fresh = _handle(backend)
    again = compact_with_plan(fresh, plan)
    again.load_state_numpy({k: weights[k] for k in weights.files})
    saved = json.load(open(out / "report.json"))
    assert saved["compaction"]["macs_after"] == comp["macs_after"]
    # inference of both models timed side by side (batch 64 by default), with the MACs ratio beside it
    lat = comp["latency"]
    assert lat["batch"] == 64 and lat["dense_ms"] > 0 and lat["compacted_ms"] > 0
    assert lat["macs_speedup"] == pytest.approx(comp["macs_before"] / comp["macs_after"], rel=1e-3)
    assert lat["speedup"] == pytest.approx(lat["dense_ms"] / lat["compacted_ms"], rel=1e-2)
    assert lat["efficiency"] == pytest.approx(lat["speedup"] / lat["macs_speedup"], rel=1e-2)
    assert "compacted" in (out / "report.md").read_text().split("| layer |")[0]
    # the settings that produced the run, defaults filled in, in both report files
    assert saved["algorithm_config"] == report["algorithm_config"]
    assert report["algorithm_config"]["keep_ratio"] == 0.5 and report["algorithm_config"]["allocation"] == "global"
    assert "| channel setting (effective) | value |" in (out / "report.md").read_text()


def test_latency_batch_setting(tmp_path):
    with pytest.raises(ConfigError, match="latency_batch"):
        RunConfig(latency_batch=-1).validate()
    report = run(RunConfig(backend="torch", model="resnet20", algorithm="channel", params={"keep_ratio": 0.5},
                           train_limit=50, test_limit=20, dense_epochs=0, prune_epochs=1, batch_size=50,
                           progress=False, latency_batch=0, out=str(tmp_path / "r")), echo=lambda *a: None)
    assert "latency" not in report["compaction"]
