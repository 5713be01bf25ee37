"""``prunekit run`` on a user's MindSpore model and image folder, the MindSpore half of issue #13's
"recipes, reports, exports, resume and data parallel work for these runs as for the twins": a
``mindcv:`` model pruned end to end and exported to MindIR (reloaded), the same run stopped after
a checkpoint and resumed to the uninterrupted run's weights bit for bit, and a
``package.module:function`` network under msrun with 2 workers in the launcher's documented form.
Pruning is checked on the weights written, not on the report."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from folder_helpers import make_image_folder
from prunekit.app.export import export_run
from prunekit.app.job import RunConfig, run
from prunekit.app.run_state import RunProgress

pytest.importorskip("mindspore")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
#: 12 training images, batch 4: 3 steps an epoch
COMMON = dict(backend="mindspore", batch_size=4, sparsity=0.5, frequency=1, input_size=16, latency_batch=0,
              progress=False)
#: 1 dense + 1 pruning epoch = 6 steps, a checkpoint after every step
RESUMED = dict(model="own_models:tiny_mindspore", model_args={"width": 6}, dense_epochs=1, prune_epochs=1,
               checkpoint_every=1, deterministic=True, **COMMON)
STOP_AT = 4  # a step of the pruning phase: the checkpoint holds masks as well as weights


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("msfolder"), per_class=4, val_per_class=2)


def _prunable_sparsity(out) -> float:
    """Zeros among the weights of the plan's layers, read from the run's weights.npz."""
    plan = json.loads((out / "plan.json").read_text())
    w = np.load(out / "weights.npz")
    arrays = [w[f"{name}.weight"] for name, _ in plan["layer_signature"]]
    assert arrays
    return sum(int((a == 0).sum()) for a in arrays) / sum(a.size for a in arrays)


def test_mindcv_resnet18_end_to_end_with_mindir(folder, tmp_path):
    """mindcv's resnet18 (refused before MindSpore's pad_mode "same" was accepted) pruned and exported."""
    pytest.importorskip("mindcv")
    out = tmp_path / "mindcv"
    report = run(RunConfig(model="mindcv:resnet18", dataset="folder", data_root=str(folder), out=str(out),
                           dense_epochs=0, prune_epochs=1, **COMMON), echo=lambda *a: None)
    w = np.load(out / "weights.npz")
    fc = [k for k in w.files if k.endswith(".weight") and w[k].ndim == 2]
    assert len(fc) == 1 and w[fc[0]].shape[0] == 3  # the folder's three classes reached the model
    assert abs(_prunable_sparsity(out) - 0.5) < 0.02
    assert report["model"] == "mindcv:resnet18" and report["run"]["classes"] == ["airplane", "cat", "ship"]
    result = export_run(str(out), "mindir")
    assert os.path.getsize(result["path"]) > 0 and result["max_abs_diff"] < 1e-4


def test_a_stopped_factory_network_run_resumes_to_the_uninterrupted_result(folder, tmp_path, monkeypatch):
    """A ``package.module:function`` network, stopped after the checkpoint of a pruning step and
    resumed with ``--resume``, ends with the weights and masks of the uninterrupted run, bit for bit.
    (mindcv's resnet18 resumes bit for bit too, but costs about 20 s more.)"""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cfg = dict(data_root=str(folder), dataset="folder", **RESUMED)
    run(RunConfig(out=str(whole), **cfg), echo=lambda *a: None)
    cfg["out"] = str(cut)

    class Stop(Exception):
        pass

    save = RunProgress.save

    def save_then_stop(self, trainer, algorithm, phase):
        save(self, trainer, algorithm, phase)
        if self.step == STOP_AT:
            raise Stop

    monkeypatch.setattr(RunProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        run(RunConfig(**cfg), echo=lambda *a: None)
    monkeypatch.setattr(RunProgress, "save", save)
    assert not (cut / "weights.npz").exists()
    run(RunConfig(resume=True, **cfg), echo=lambda *a: None)
    a, b = np.load(whole / "weights.npz"), np.load(cut / "weights.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    pa, pb = np.load(whole / "plan.npz"), np.load(cut / "plan.npz")
    assert sorted(pa.files) == sorted(pb.files) and all(np.array_equal(pa[k], pb[k]) for k in pa.files)


def test_a_factory_network_under_msrun_prunes(folder, tmp_path):
    """The launcher's documented form, ``PATH=VENV/bin:$PATH msrun ... VENV/bin/prunekit run ...``,
    with 2 workers on a ``package.module:function`` network (found through PYTHONPATH)."""
    msrun, prunekit = shutil.which("msrun", path=VENV_BIN), shutil.which("prunekit", path=VENV_BIN)
    if msrun is None or prunekit is None or shutil.which("python", path=VENV_BIN) is None:
        pytest.skip("msrun, prunekit or python not found beside the Python interpreter")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MS_ROLE", "MS_WORKER_NUM"):
        env.pop(key, None)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "dp"
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
           f"--log_dir={tmp_path / 'logs'}", prunekit, "run", "--backend", "mindspore",
           "--model", "own_models:tiny_mindspore", "--dataset", "folder", "--data-root", str(folder),
           "--input-size", "16", "--dense-epochs", "0", "--prune-epochs", "1", "--batch-size", "4",
           "--sparsity", "0.5", "--frequency", "1", "--latency-batch", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.log"))}
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + "".join(t[-2000:] for t in logs.values())
    # rank 0 alone printed the job (each worker writes its own log)
    assert [logs.get(f"worker_{r}.log", "").count("prunable layers") for r in (0, 1)] == [1, 0]
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["steps"] == 3  # 12 images, global batch 4: the two workers split each batch
    assert abs(_prunable_sparsity(out) - 0.5) < 0.02
    w = np.load(out / "weights.npz")
    assert w["conv1.weight"].shape == (4, 3, 3, 3) and w["fc.weight"].shape == (3, 8)
