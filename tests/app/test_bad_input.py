"""Bad input, of every kind a user or a careless script produces, through the command line, a
recipe and the Python API: each is refused with exit status 2 and one ``prunekit: error:`` line
naming the key, the value and what is allowed, before any data is read or file written (the
output folder is left exactly as it was). Grows with each kind found; the divergence cases (a run
that goes NaN) and the restricted CIFAR unpickler are here too."""
import json
import os
import pickle

import numpy as np
import pytest

from prunekit.app import checkpoint as ckpt
from prunekit.app.cli import main
from prunekit.app.job import RunConfig
from prunekit.app.recipe import config_from_mapping
from prunekit.decisions.plan import PruningPlan
from prunekit.errors import ConfigError, DataError, PlanError

TINY = ["--backend", "torch", "--model", "mnist_cnn", "--dataset", "mnist", "--train-limit", "64", "--test-limit",
        "32", "--batch-size", "32", "--dense-epochs", "0", "--prune-epochs", "1", "--no-progress",
        "--latency-batch", "0"]


def _snapshot(folder):
    """Every path under ``folder`` with its size and mtime (empty when it does not exist)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _refused(argv, capsys, *needles, watch=None):
    """``prunekit argv`` exits 2 with one ``prunekit: error:`` line holding every needle, and
    ``watch`` (a folder) is untouched."""
    before = _snapshot(watch) if watch else None
    status = main(argv)
    captured = capsys.readouterr()
    err_lines = [l for l in captured.err.splitlines() if l.strip()]
    assert status == 2, captured.err
    assert len(err_lines) == 1 and err_lines[0].startswith("prunekit: error: "), captured.err
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]
    if watch:
        assert _snapshot(watch) == before
    return err_lines[0]


def _exit_status(argv, capsys):
    """``main`` for argument-parser errors, which end through SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------- settings, CLI
@pytest.mark.parametrize("extra, needles", [
    (["--schedule", "weekly"], ["schedule", "'weekly'", "cubic, exponential, oneshot"]),
    (["--lr", "-0.1"], ["lr", "-0.1", "(0, inf)"]),
    (["--lr", "nan"], ["lr", "nan"]),
    (["--weight-decay=-1e-4"], ["weight_decay", "-0.0001", "[0, inf)"]),
    (["--train-limit", "0"], ["train_limit", "0", "'all'"]),
    (["--test-limit", "-3"], ["test_limit", "-3"]),
    (["--train-limit", "16"], ["batch_size 32", "train_limit 16"]),
    (["--frequency", "0"], ["frequency", "0"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--optimizer", "rmsprop"], ["optimizer", "'rmsprop'", "sgd, adam"]),
    (["--sparsity", "1.5"], ["sparsity", "1.5"]),
    (["--algorithm", "rpg", "--set", "lam=abc"], ["'lam'", "'abc'", "number"]),
    (["--algorithm", "rpg", "--set", "partial_k=[1]"], ["'partial_k'", "[1]"]),
    (["--algorithm", "dsa", "--set", "budget=lots"], ["'budget'", "'lots'"]),
    (["--set", "nonsense=1"], ["nonsense", "allowed"]),
    (["--set", "novalue"], ["--set", "KEY=VALUE", "'novalue'"]),
    (["--decompose-threshold", "-1"], ["decompose_threshold", "-1"]),
    (["--backend", "tensorflow"], ["backend", "'tensorflow'"]),
    (["--model", "vgg99"], ["model", "'vgg99'"]),
])
def test_bad_run_setting_is_one_line_and_writes_nothing(tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    _refused(["run", *TINY, *extra, "--out", str(out)], capsys, *needles, watch=tmp_path)
    assert not out.exists()


def test_argument_parser_errors_are_prunekit_errors(tmp_path, capsys):
    for argv, needle in ((["run", *TINY, "--lr", "abc"], "--lr"), (["run", *TINY, "--train-limit", "many"], "'many'"),
                         (["run", "--no-such-flag"], "--no-such-flag"), (["frobnicate"], "frobnicate")):
        code, err = _exit_status(argv, capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("prunekit: error: ") and needle in lines[0], err
    assert os.listdir(tmp_path) == []


def test_device_without_the_hardware_is_refused_before_data(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _refused(["run", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")], capsys, "device", "'cuda'",
             "--device cpu", watch=tmp_path)
    _refused(["run", *TINY, "--device", "tpu9", "--out", str(tmp_path / "o")], capsys, "device", "'tpu9'",
             watch=tmp_path)


# ---------------------------------------------------------------------------- the output folder
def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    _refused(["run", *TINY, "--out", str(f)], capsys, "out", "is a file", watch=tmp_path)
    _refused(["run", *TINY, "--out", str(f / "run")], capsys, "out", "is a file", watch=tmp_path)
    assert f.read_text() == "mine"


def test_read_only_out_is_refused(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    # as root the permission bits do not bind; pretend they do for this folder
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro) else real(p, mode, **kw))
    _refused(["run", *TINY, "--out", str(ro / "run")], capsys, "out", "not writable", watch=tmp_path)


def _fake_run(folder):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text('{"accuracy": {"after_pruning": 0.9}}')
    (folder / "weights.npz").write_bytes(b"precious")


def test_out_holding_another_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "runs" / "a"
    _fake_run(out)
    _refused(["run", *TINY, "--out", str(out)], capsys, "already holds a run", "--overwrite", "--resume", watch=tmp_path)
    _refused(["run", *TINY, "--out", str(out), "--overwrite", "--resume"], capsys, "resume", "overwrite",
             watch=tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: mnist_cnn\ndataset: mnist\nout: {out}\n")
    _refused(["run", "--recipe", str(recipe), "--no-progress"], capsys, "already holds a run", watch=tmp_path)


def test_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "a"
    _fake_run(out)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.npz").write_bytes(b"old run")
    assert main(["run", *TINY, "--out", str(out), "--overwrite", "--checkpoint-every", "0"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["run"]["algorithm"] == "magnitude" and (out / "weights.npz").read_bytes() != b"precious"
    assert not (out / "checkpoint").exists()  # the replaced run's checkpoint cannot be resumed by mistake


# ---------------------------------------------------------------------------- the Python API, recipes
@pytest.mark.parametrize("field, value", [
    ("lr", "0.1"), ("sparsity", "high"), ("dense_epochs", 1.5), ("batch_size", "32"), ("params", ["lam", 1]),
    ("augment", "yes"), ("train_limit", 10.0), ("momentum", 1.5), ("end_fraction", 0.0), ("weight_decay", -1.0),
    ("scope", "everywhere"), ("granularity", "block"), ("out", ""), ("seed", None),
])
def test_wrong_typed_api_settings_name_the_key(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        RunConfig(**{field: value}).validate()
    assert repr(value) in str(e.value) or field in ("out",)


def test_recipe_values_are_checked_like_flags():
    with pytest.raises(ConfigError, match="lr"):
        config_from_mapping({"lr": -1})
    with pytest.raises(ConfigError, match="schedule"):
        config_from_mapping({"schedule": "weekly"})


def test_path_objects_are_accepted_for_folders(tmp_path):
    cfg = RunConfig(out=tmp_path / "x", data_root=tmp_path).validate()
    assert cfg.out == str(tmp_path / "x") and cfg.data_root == str(tmp_path)


# ---------------------------------------------------------------------------- plans, conformance
def test_plan_whose_masks_are_not_zero_one_is_refused(tmp_path):
    plan = PruningPlan(model="m", masks={"fc": np.ones((2, 3), bool)})
    plan.save(str(tmp_path / "plan"))
    np.savez(tmp_path / "plan.npz", fc=np.full((2, 3), 0.5, np.float32))  # replaced by a non-0/1 mask
    with pytest.raises(PlanError, match="'fc' holds 6 value"):
        PruningPlan.load(str(tmp_path / "plan"))
    np.savez(tmp_path / "plan.npz", fc=np.array([[0, 1, 1], [1, 0, 1]], np.float32))
    np.testing.assert_array_equal(PruningPlan.load(str(tmp_path / "plan")).masks["fc"],
                                  [[False, True, True], [True, False, True]])
    with pytest.raises(PlanError, match="other than 0 and 1"):
        PruningPlan(masks={"fc": np.full((2, 3), 2.0)}).check_matches([])


def test_conformance_selection_matching_nothing_is_an_error(tmp_path, capsys):
    out = tmp_path / "conf"
    _refused(["conformance", "--backends", "torch", "-k", "no-such-case", "--out", str(out)], capsys,
             "'no-such-case'", "matches no conformance case", watch=tmp_path)
    _refused(["conformance", "--backends", "torch,caffe", "--out", str(out)], capsys, "'caffe'", watch=tmp_path)
    assert not out.exists()


# ---------------------------------------------------------------------------- data files
class _Exploit:
    """Pickles to a call of ``open(path, "w")``: loading it with ``pickle.load`` creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_cifar_batch_is_refused_and_never_executed(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": _Exploit(str(marker)), b"labels": [0]}, f)
    with open(folder / "data_batch_1", "rb") as f:  # the file is a working exploit for a plain unpickler
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    from prunekit.app.data import load_dataset

    with pytest.raises(DataError, match="damaged or not a CIFAR-10 batch.*io.open"):
        load_dataset("cifar10", folder)
    assert not marker.exists()
    out = tmp_path / "out"
    _refused(["run", "--backend", "torch", "--model", "resnet20", "--dataset", "cifar10", "--data-root", str(folder),
              "--out", str(out), "--no-progress"], capsys, "data_batch_1", "damaged")
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_divergent_run_stops_with_the_step_and_layer_and_keeps_the_last_good_checkpoint(backend, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--backend", backend, *TINY[2:], "--dense-epochs", "1", "--train-limit", "128", "--lr", "1e6",
            "--checkpoint-every", "1", "--out", str(out)]
    line = _refused(args, capsys, "training diverged at step", "non-finite", "first layer affected")
    report = json.load(open(out / "report.json"))
    assert report["status"] == "failed" and report["failed_at_step"] >= 1
    assert f"at step {report['failed_at_step']} of the run" in line
    assert not (out / "weights.npz").exists() and not (out / "plan.json").exists()
    if report["failed_at_step"] > 1:  # the checkpoint of the step before, never one with NaN
        state = ckpt.read_checkpoint(ckpt.checkpoint_path(str(out)))
        assert state["position"]["step"] == report["failed_at_step"] - 1 == report["last_checkpoint_step"]
        assert all(np.isfinite(v).all() for v in state["model"].values())
