"""Exports: ONNX (onnxruntime), MindIR (GraphCell), and pruned models carried across frameworks as
PyTorch ``.pt`` / MindSpore ``.ckpt`` with a structure description, each checked against the
source model's outputs on real CIFAR-10 test images; ``prunekit export`` on a run folder.

Decomposed models are TRP decompositions of the trained ResNet-20 (tests/data), where BN
statistics and low-rank factors are those of a real model.
"""
import json
import os

import numpy as np
import pytest

from prunekit.app import data
from prunekit.algorithms.trp import plan_decompositions
from prunekit.errors import ConfigError, ModelError, PlanError
from prunekit.app.export import ModelStructure, load_run, structure_path

TOL = 1e-4


@pytest.fixture(scope="module")
def images():
    ds = data.load_dataset("cifar10", train_limit=10, test_limit=16)
    x, _ = next(iter(data.batches(ds.x_test, ds.y_test, 16, shuffle=False, drop_last=False, mean=ds.mean, std=ds.std)))
    return x


def _need(module):
    return pytest.importorskip(module)


def _torch_decomposed(trained_state):
    import prunekit.backends.torch as bt

    handle = bt.model_handle("resnet20")
    handle.load_state_numpy(trained_state)
    decompositions = plan_decompositions(handle, "channel", threshold=None, energy=0.9)
    handle = bt.apply_decompositions(handle, decompositions)
    structure = ModelStructure.of("resnet20", handle, decompositions)
    assert any(d.rank < min(d.first.weight.shape[1] * 9, d.second.weight.shape[0]) for d in decompositions)
    return handle, structure


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_onnx_of_decomposed_torch_model_matches(trained_state, images, tmp_path):
    _need("onnxruntime")
    from prunekit.backends.torch.export import export_onnx, onnx_outputs

    handle, _ = _torch_decomposed(trained_state)
    path = str(tmp_path / "resnet20_trp.onnx")
    result = export_onnx(handle, path, images)
    # checked again here, on another batch size (the batch axis is dynamic)
    diff = _max_diff(onnx_outputs(path, images[:5]), handle.predict(images[:5]))
    print(f"ONNX vs PyTorch, decomposed ResNet-20: max |diff| {result['max_abs_diff']:.3g} (16 images), {diff:.3g} (5)")
    assert result["max_abs_diff"] <= TOL and diff <= TOL
    assert sorted(os.listdir(tmp_path)) == ["resnet20_trp.onnx"]  # no temporary file left


def test_cross_framework_decomposed_torch_to_mindspore_ckpt_and_mindir(trained_state, images, tmp_path):
    _need("mindspore")
    import mindspore as ms

    import prunekit.backends.mindspore as bm
    from prunekit.backends.mindspore.export import export_mindir, load_checkpoint, mindir_outputs, save_checkpoint

    source, structure = _torch_decomposed(trained_state)
    expected = source.predict(images)
    twin = structure.build(bm, source.state_numpy())  # TRP replayed at the same ranks
    path = str(tmp_path / "resnet20_trp.ckpt")
    save_checkpoint(twin, path, structure)
    saved = ms.load_checkpoint(path)
    # MindSpore's own parameter names: BN leaves gamma/beta/moving_*, factors <conv>.0 / <conv>.1
    assert set(saved) == {p.name for p in twin.model.get_parameters()}
    assert "bn1.gamma" in saved and "layer3.2.bn2.moving_variance" in saved
    assert "layer1.0.conv1.0.weight" in saved and "layer1.0.conv1" not in {k.rsplit(".", 1)[0] for k in saved}
    fresh = structure.build(bm)  # MindSpore's own loader accepts the file as well
    not_loaded, unused = ms.load_param_into_net(fresh.model, saved, strict_load=True)
    assert not not_loaded and not unused
    assert _max_diff(fresh.predict(images), expected) <= TOL

    loaded = load_checkpoint(path)  # rebuilt from resnet20_trp.structure.json alone
    diff_ckpt = _max_diff(loaded.predict(images), expected)
    result = export_mindir(loaded, str(tmp_path / "resnet20_trp.mindir"), images, expected)
    diff_mindir = _max_diff(mindir_outputs(str(tmp_path / "resnet20_trp.mindir"), images[:3]), expected[:3])
    print(f"PyTorch -> MindSpore ckpt: max |diff| {diff_ckpt:.3g}; MindIR (GraphCell) vs PyTorch: "
          f"{result['max_abs_diff']:.3g} (16 images), {diff_mindir:.3g} (3)")
    assert diff_ckpt <= TOL and result["max_abs_diff"] <= TOL and diff_mindir <= TOL


def test_cross_framework_pruned_mindspore_to_torch_state_dict(trained_state, images, tmp_path):
    _need("mindspore")
    import torch

    import prunekit.backends.mindspore as bm
    from prunekit.backends.torch.export import load_state_dict, save_state_dict
    from prunekit.algorithms import make_algorithm

    source = bm.model_handle("resnet20")
    source.load_state_numpy(trained_state)
    algorithm = make_algorithm("magnitude", sparsity=0.7, schedule="oneshot")
    algorithm.bind(source, 1)
    algorithm.before_step(0)  # one-shot global magnitude pruning: masks applied to the weights
    assert algorithm.masks
    structure = ModelStructure.of("resnet20", source)
    import prunekit.backends.torch as bt
    torch_twin = structure.build(bt, source.state_numpy())
    path = str(tmp_path / "resnet20_pruned.pt")
    save_state_dict(torch_twin, path, structure)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(bt.model_handle("resnet20").model.state_dict())  # a plain PyTorch state_dict
    loaded = load_state_dict(path)
    diff = _max_diff(loaded.predict(images), source.predict(images))
    print(f"MindSpore -> PyTorch state_dict, 70% magnitude-pruned ResNet-20: max |diff| {diff:.3g}")
    assert diff <= TOL
    zeros = {n: np.count_nonzero(w == 0) for n, w in loaded.weights_numpy().items()}
    assert zeros == {n: np.count_nonzero(w == 0) for n, w in source.weights_numpy().items()}


def _compact_keep(handle):
    from prunekit.decisions.channel_groups import find_channel_groups

    keep = {}
    for g in find_channel_groups(handle):
        if g.prunable and g.size >= 8:
            keep[g.name] = list(range(0, g.size, 2))  # every other channel
    assert keep
    return keep


def test_compacted_model_exports_and_crosses_frameworks(trained_state, images, tmp_path):
    _need("onnxruntime")
    _need("mindspore")
    import prunekit.backends.mindspore as bm
    import prunekit.backends.torch as bt
    from prunekit.backends.mindspore.export import load_checkpoint, save_checkpoint
    from prunekit.backends.torch.export import export_onnx

    if not hasattr(bt, "compact") or not hasattr(bm, "compact"):
        pytest.skip("channel compaction (backend.compact) is not in this tree")
    handle = bt.model_handle("resnet20")
    handle.load_state_numpy(trained_state)
    keep = _compact_keep(handle)
    small = bt.compact(handle, keep)
    structure = ModelStructure.of("resnet20", small, kept_channels=keep)
    expected = small.predict(images)
    onnx = export_onnx(small, str(tmp_path / "small.onnx"), images)
    twin = structure.build(bm, small.state_numpy())
    save_checkpoint(twin, str(tmp_path / "small.ckpt"), structure)
    loaded = load_checkpoint(str(tmp_path / "small.ckpt"))
    diff = _max_diff(loaded.predict(images), expected)
    print(f"compacted ResNet-20 ({sum(len(v) for v in keep.values())} kept channels): ONNX max |diff| "
          f"{onnx['max_abs_diff']:.3g}; PyTorch -> MindSpore ckpt {diff:.3g}")
    assert onnx["max_abs_diff"] <= TOL and diff <= TOL
    for group, kept in keep.items():  # a group is named after its first producer
        assert loaded.layer(group).out_channels == len(kept) < handle.layer(group).out_channels


def test_export_errors_leave_files_alone(tmp_path):
    import prunekit.backends.torch as bt
    from prunekit.backends.torch.export import export_onnx, load_state_dict, save_state_dict

    handle = bt.model_handle("mnist_cnn", in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match=r"\.onnx"):
        export_onnx(handle, str(tmp_path / "model.bin"))
    # a file whose outputs do not match the reference is not kept (here: a wrong reference)
    x = ModelStructure.of("mnist_cnn", handle).example_input(2)
    with pytest.raises(ModelError, match="differs from the reference"):
        export_onnx(handle, str(tmp_path / "model.onnx"), x, handle.predict(x) + 0.5)
    assert not os.listdir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(str(tmp_path / "missing"))
    path = str(tmp_path / "m.pt")
    save_state_dict(handle, path, ModelStructure.of("mnist_cnn", handle))
    # a structure whose decomposition does not fit the weights
    doc = json.load(open(structure_path(path)))
    doc["decomposition"] = {"scheme": "channel", "ranks": {"conv2": 4}}
    json.dump(doc, open(structure_path(path), "w"))
    with pytest.raises(PlanError, match="does not fit"):
        load_state_dict(path)
    json.dump({"format": "something else"}, open(structure_path(path), "w"))
    with pytest.raises(PlanError, match="not a prunekit structure"):
        load_state_dict(path)
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.structure.json"]


def test_cli_export_of_a_trp_run_folder(tmp_path, capsys):
    _need("onnxruntime")
    _need("mindspore")
    from prunekit.app.cli import main
    from prunekit.app.job import RunConfig, run

    out = str(tmp_path / "run")
    report = run(RunConfig(backend="torch", model="mnist_cnn", dataset="mnist", algorithm="trp", dense_epochs=0,
                           prune_epochs=1, batch_size=32, train_limit=64, test_limit=20, out=out, progress=False,
                           lr=0.05), echo=lambda *a: None)
    ranks = report["decomposition"]["ranks"]
    assert ranks and load_run(out)[0].ranks == ranks
    diffs = {}
    for fmt, suffix in (("onnx", ".onnx"), ("torch", ".pt"), ("mindspore-ckpt", ".ckpt"), ("mindir", ".mindir")):
        assert main(["export", out, "--format", fmt]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"wrote {os.path.join(out, 'model' + suffix)}"), line
        diffs[fmt] = float(line.rsplit(" ", 1)[-1])
        assert os.path.exists(os.path.join(out, "model" + suffix))
    print(f"prunekit export, TRP mnist_cnn (ranks {ranks}): max |diff| vs the torch model {diffs}")
    assert all(d <= TOL for d in diffs.values())
    # the .ckpt and .pt reload on their own, from the structure description written beside them
    from prunekit.backends.mindspore.export import load_checkpoint
    from prunekit.backends.torch.export import load_state_dict
    x = ModelStructure.load(os.path.join(out, "model.structure.json")).example_input(4)
    a = load_state_dict(os.path.join(out, "model.pt")).predict(x)
    b = load_checkpoint(os.path.join(out, "model.ckpt")).predict(x)
    assert _max_diff(a, b) <= TOL
    # bad requests: one-line errors, exit status 2, nothing written
    before = sorted(os.listdir(out))
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    assert main(["export", out, "--format", "onnx", "--out", str(tmp_path / "x.mindir")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_cli_export_of_a_compacted_run_folder(tmp_path, capsys):
    _need("onnxruntime")
    _need("mindspore")
    from prunekit.backends.mindspore.export import load_checkpoint
    from prunekit.algorithms import algorithm_names
    from prunekit.app.cli import main
    from prunekit.app.job import RunConfig, run

    if "channel" not in algorithm_names():
        pytest.skip("no channel-pruning algorithm in this tree")
    out = str(tmp_path / "run")
    report = run(RunConfig(backend="torch", model="mnist_cnn", dataset="mnist", algorithm="channel", dense_epochs=0,
                           prune_epochs=1, batch_size=32, train_limit=64, test_limit=20, out=out, progress=False,
                           lr=0.05, params={"target": "channels", "keep_ratio": 0.5}), echo=lambda *a: None)
    groups = report["compaction"]["groups"]
    assert any(g["kept"] < g["size"] for g in groups.values())
    structure = load_run(out)[0]
    assert structure.kept_channels == {k: g["kept_channels"] for k, g in groups.items()}
    for fmt in ("onnx", "mindspore-ckpt"):
        assert main(["export", out, "--format", fmt]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        print(line)
        assert float(line.rsplit(" ", 1)[-1]) <= TOL
    loaded = load_checkpoint(os.path.join(out, "model.ckpt"))
    fc1 = loaded.layer("fc1")
    assert fc1.out_channels == groups["fc1"]["kept"] < groups["fc1"]["size"]
    logits = loaded.predict(structure.example_input(4))
    assert np.std(logits, axis=0).max() > 1e-4  # the narrow model still tells images apart
