"""``prunekit run`` on a user's model, weights and image folder, end to end: a torchvision model from
a recipe with ``model_args`` (pruned, exported to ONNX, its weights checked, not its report), a
run stopped after a checkpoint and resumed to the uninterrupted result, ``--weights`` that do not
fit refused before training writes anything, a ``package.module:function`` MindSpore network on
the MindSpore backend exported to MindIR, and a run under torchrun. The MindSpore counterparts
(a mindcv model end to end, resume, msrun) are in ``test_own_model_mindspore.py``."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from folder_helpers import make_image_folder
from prunekit.app.cli import main
from prunekit.app.export import export_run, structure_path
from prunekit.app.job import RunConfig, run
from prunekit.app.run_state import RunProgress
from prunekit.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
TV = {"model": "torchvision:mobilenet_v3_small", "model_args": {"width_mult": 0.25}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("own"), per_class=8, val_per_class=4)


def _settings(folder, out, **extra):
    base = dict(backend="torch", dataset="folder", data_root=str(folder), input_size=16, dense_epochs=0,
                prune_epochs=1, batch_size=6, sparsity=0.5, frequency=1, latency_batch=0, progress=False,
                out=str(out))
    base.update(extra)
    return base


def _prunable_sparsity(out) -> float:
    """Zeros among the weights of the plan's layers, read from the run's weights.npz."""
    plan = json.loads((out / "plan.json").read_text())
    w = np.load(out / "weights.npz")
    arrays = [w[f"{name}.weight"] for name, _ in plan["layer_signature"]]
    return sum(int((a == 0).sum()) for a in arrays) / sum(a.size for a in arrays)


def test_torchvision_model_from_a_recipe_prunes_and_exports(folder, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_settings(folder, out, **TV)))
    assert main(["run", "--recipe", str(recipe)]) == 0
    w = np.load(out / "weights.npz")
    assert w["features.0.0.weight"].shape == (8, 3, 3, 3)  # width_mult 0.25 reached the model (16 at 1.0)
    assert w["classifier.3.weight"].shape[0] == 3  # the folder's three classes
    assert abs(_prunable_sparsity(out) - 0.5) < 0.01
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "torchvision:mobilenet_v3_small"
    assert report["run"]["model_args"] == {"width_mult": 0.25} and report["run"]["image_size"] == 16
    result = export_run(str(out), "onnx")
    assert os.path.getsize(result["path"]) > 0 and result["max_abs_diff"] < 1e-3


def test_a_stopped_torchvision_run_resumes_to_the_uninterrupted_result(folder, tmp_path, monkeypatch):
    common = dict(checkpoint_every=2, deterministic=True, **TV)
    run(RunConfig(**_settings(folder, tmp_path / "whole", **common)), echo=lambda *a: None)

    class Stop(Exception):
        pass

    save = RunProgress.save

    def save_then_stop(self, trainer, algorithm, phase):
        save(self, trainer, algorithm, phase)
        if self.step == 2:
            raise Stop

    monkeypatch.setattr(RunProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        run(RunConfig(**_settings(folder, tmp_path / "cut", **common)), echo=lambda *a: None)
    monkeypatch.setattr(RunProgress, "save", save)
    run(RunConfig(**_settings(folder, tmp_path / "cut", resume=True, **common)), echo=lambda *a: None)
    a, b = np.load(tmp_path / "whole" / "weights.npz"), np.load(tmp_path / "cut" / "weights.npz")
    assert sorted(a.files) == sorted(b.files)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_weights_that_do_not_fit_are_refused_before_training(folder, tmp_path, capsys):
    import torch

    from own_models import tiny_torch

    wrong = tmp_path / "wrong.pt"
    torch.save(tiny_torch(num_classes=5).state_dict(), wrong)
    out = tmp_path / "run"
    args = ["run", "--model", "own_models:tiny_torch", "--dataset", "folder", "--data-root", str(folder),
            "--input-size", "16", "--weights", str(wrong), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert "mis-shaped: 7.weight (file (5, 8), model (3, 8))" in capsys.readouterr().err
    assert not out.exists()


def test_mindspore_factory_network_end_to_end_with_mindir(folder, tmp_path):
    pytest.importorskip("mindspore")
    out = tmp_path / "ms"
    cfg = RunConfig(**_settings(folder, out, backend="mindspore", model="own_models:tiny_mindspore",
                                model_args={"width": 6}))
    report = run(cfg, echo=lambda *a: None)
    assert np.load(out / "weights.npz")["conv1.weight"].shape == (6, 3, 3, 3)
    assert abs(_prunable_sparsity(out) - 0.5) < 0.02
    assert report["run"]["classes"] == ["airplane", "cat", "ship"]
    result = export_run(str(out), "mindir")
    assert os.path.getsize(result["path"]) > 0 and result["max_abs_diff"] < 1e-4
    with pytest.raises(ConfigError, match="only the reference models"):
        export_run(str(out), "onnx")


def test_a_user_model_under_torchrun(folder, tmp_path):
    out = tmp_path / "dp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MS_ROLE", "MS_WORKER_NUM"):
        env.pop(key, None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={port}", "-m", "prunekit", "run", "--model",
           "own_models:tiny_torch", "--dataset", "folder", "--data-root", str(folder), "--input-size", "16",
           "--dense-epochs", "0", "--prune-epochs", "1", "--batch-size", "6", "--sparsity", "0.5", "--frequency", "1",
           "--latency-batch", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("prunable layers") == 1  # rank 0 alone prints
    assert abs(_prunable_sparsity(out) - 0.5) < 0.02
