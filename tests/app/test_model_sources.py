"""``--model`` names and ``--weights`` files: parsing against the backend (reference models, the
sources each backend registers, ``package.module:function`` factories), the clear errors, the
refusal to replay a plan of a non-reference model on another backend, and weight files checked
entry by entry (missing, unexpected, mis-shaped) before they are loaded."""
import types

import numpy as np
import pytest

from prunekit.algorithms import apply_plan
from prunekit.app import model_sources
from prunekit.app.cli import main
from prunekit.app.model_sources import FACTORY, REFERENCE, SOURCE, build_handle, check_replay, parse_model
from prunekit.app.user_weights import check_weights_path, load_weights_file
from prunekit.contract.backend import get_backend
from prunekit.decisions.plan import PruningPlan
from prunekit.errors import ConfigError, ModelError, PlanError


def test_names_parse_to_their_kind_and_backend():
    assert parse_model("ResNet20").kind == REFERENCE
    tv = parse_model("torchvision:resnet18", "torch")
    assert (tv.kind, tv.source, tv.name, tv.backend) == (SOURCE, "torchvision", "resnet18", "torch")
    assert parse_model("mindcv:resnet50", "ms").backend == "mindspore"
    f = parse_model("own_models:tiny_torch", "mindspore")
    assert (f.kind, f.source, f.name, f.backend) == (FACTORY, "own_models", "tiny_torch", None)


@pytest.mark.parametrize("text, backend, message", [
    ("torchvision:resnet18", "mindspore", "built by the torch backend only, not by backend 'mindspore'"),
    ("mindcv:resnet50", "torch", "built by the mindspore backend only"),
    ("resnet999", "torch", "unknown model 'resnet999'"),
    ("no_such_module_xyz:make", "torch", "no module 'no_such_module_xyz' can be imported"),
    ("bad name:x", "torch", "expected a reference model"),
    ("torchvision:", "torch", "expected torchvision:NAME"),
])
def test_names_that_do_not_fit_are_refused(text, backend, message):
    with pytest.raises(ConfigError, match=message):
        parse_model(text, backend)


def test_a_source_whose_package_is_missing_is_refused(monkeypatch):
    monkeypatch.setattr(model_sources, "registered_sources", lambda: {"fakezoo": ("torch", "no_such_pkg_xyz")})
    with pytest.raises(ConfigError, match="needs the no_such_pkg_xyz package, which is not installed"):
        parse_model("fakezoo:net", "torch")


def test_plans_of_non_reference_models_do_not_replay_on_another_backend():
    plan = PruningPlan(model="torchvision:resnet18", backend="torch")
    with pytest.raises(PlanError, match="only the reference models .* replay across backends"):
        apply_plan(types.SimpleNamespace(backend="mindspore"), plan)
    with pytest.raises(ConfigError, match="cannot be rebuilt on backend 'mindspore'"):
        check_replay("own_models:tiny_torch", "torch", "mindspore")
    check_replay("resnet20", "torch", "mindspore")  # the twins do


def test_unknown_names_of_a_source_and_bad_factories_are_refused():
    torch_backend = get_backend("torch")
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet181'; similar: resnet"):
        torch_backend.check_model_source(parse_model("torchvision:resnet181", "torch"))
    with pytest.raises(ConfigError, match="returned a str, not a PyTorch nn.Module"):
        build_handle(torch_backend, "own_models:not_a_network", 3, 3, 16)
    with pytest.raises(ConfigError, match="own_models has no callable 'nothing'"):
        build_handle(torch_backend, "own_models:nothing", 3, 3, 16)
    with pytest.raises(ModelError, match=r"fails on an input of shape \(3, 16, 16\): AssertionError: expected 64x64"):
        build_handle(torch_backend, "own_models:needs_64", 3, 3, 16)
    assert len(build_handle(torch_backend, "own_models:needs_64", 3, 3, 64).layers) == 1


def test_weight_paths_are_checked_before_reading(tmp_path):
    ckpt = tmp_path / "net.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"backend 'torch' reads .pt, .pth, .npz files; .ckpt is a MindSpore file"):
        check_weights_path(str(ckpt), "torch")
    with pytest.raises(ConfigError, match="does not exist"):
        check_weights_path(str(tmp_path / "none.pt"), "torch")


def test_torch_state_dict_is_checked_entry_by_entry_then_loaded(tmp_path):
    import torch

    backend = get_backend("torch")
    src = build_handle(backend, "own_models:tiny_torch", 3, 3, 16, seed=1, model_args={"width": 4})
    dst = build_handle(backend, "own_models:tiny_torch", 3, 3, 16, seed=2, model_args={"width": 4})
    state = src.model.state_dict()
    good = tmp_path / "good.pt"
    torch.save(state, good)
    bad = dict(state)
    bad.pop("0.weight")
    bad["7.weight"] = torch.zeros(5, 8)
    bad["extra.bias"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pth")
    before = dst.state_numpy()
    with pytest.raises(ModelError, match=r"1 missing: 0.weight; 1 unexpected: extra.bias; "
                                         r"1 mis-shaped: 7.weight \(file \(5, 8\), model \(3, 8\)\)"):
        load_weights_file(backend, dst, str(tmp_path / "bad.pth"))
    assert all(np.array_equal(before[k], v) for k, v in dst.state_numpy().items())  # left as it was
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "code.pt")  # a pickled module, not a state_dict
    with pytest.raises(ConfigError, match="not a plain PyTorch state_dict"):
        load_weights_file(backend, dst, str(tmp_path / "code.pt"))
    load_weights_file(backend, dst, str(good))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(dst.predict(x), src.predict(x))


def test_mindspore_checkpoint_is_checked_then_loaded(tmp_path):
    ms = pytest.importorskip("mindspore")
    backend = get_backend("mindspore")
    src = build_handle(backend, "own_models:tiny_mindspore", 3, 3, 16, seed=1)
    dst = build_handle(backend, "own_models:tiny_mindspore", 3, 3, 16, seed=2)
    ms.save_checkpoint(src.model, str(tmp_path / "good.ckpt"))
    wide = build_handle(backend, "own_models:tiny_mindspore", 3, 3, 16, model_args={"width": 6})
    ms.save_checkpoint(wide.model, str(tmp_path / "wide.ckpt"))
    with pytest.raises(ModelError, match=r"mis-shaped: conv1.weight \(file \(6, 3, 3, 3\), model \(4, 3, 3, 3\)\)"):
        load_weights_file(backend, dst, str(tmp_path / "wide.ckpt"))
    load_weights_file(backend, dst, str(tmp_path / "good.ckpt"))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.allclose(dst.predict(x), src.predict(x), atol=1e-6)


def test_list_shows_the_installed_sources(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:NAME, timm:NAME (torch)" in out and "mindcv:NAME (mindspore)" in out
    assert "folder" in out and "magnitude" in out
