"""The main job end to end on real data (tiny settings), and its input checks."""
import json

import numpy as np
import pytest

from prunekit.app.cli import main
from prunekit.errors import ConfigError
from prunekit.app.job import RunConfig, run

TINY = dict(model="resnet20", dataset="cifar10", train_limit=200, test_limit=100, dense_epochs=1, prune_epochs=1,
            batch_size=50, progress=False)


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_job_prunes_and_reports_measured_values(backend, tmp_path):
    out = tmp_path / "run"
    report = run(RunConfig(backend=backend, sparsity=0.75, out=str(out), **TINY), echo=lambda *a: None)
    weights = np.load(out / "weights.npz")
    conv_fc = [k for k in weights.files if k.endswith(".weight") and weights[k].ndim in (2, 4)]
    total = sum(weights[k].size for k in conv_fc)
    nonzero = sum(np.count_nonzero(weights[k]) for k in conv_fc)
    # the report's sparsity is what the saved weights hold, and it reaches the target
    assert report["totals"]["prunable_params"] == total
    assert report["totals"]["prunable_nonzero"] == nonzero
    assert abs(report["totals"]["prunable_sparsity"] - 0.75) < 1e-4
    assert report["totals"]["effective_macs"] < report["totals"]["dense_macs"]
    assert set(report["accuracy"]) == {"before_pruning", "after_pruning"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    saved = json.load(open(out / "report.json"))
    assert saved["totals"]["prunable_nonzero"] == nonzero
    assert (out / "report.md").exists() and (out / "plan.json").exists() and (out / "plan.npz").exists()


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--algorithm", "nosuch"], "unknown algorithm 'nosuch'"),
    (["--backend", "jax"], "unknown backend 'jax'"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["--granularity", "block"], None),
])
def test_cli_rejects_bad_settings_without_writing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        status = main(["run", "--out", str(out), "--no-progress"] + args)
    except SystemExit as e:  # argparse choices
        status = e.code
    assert status == 2
    if message:
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "no-cifar-here"
    status = main(["run", "--data-root", str(missing), "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="prune_epochs"):
        RunConfig(prune_epochs=0).validate()
    with pytest.raises(ConfigError, match="batch_size"):
        RunConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="granularity"):
        RunConfig(granularity="block").validate()


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_job_runs_rpg_with_ranks_in_report(backend, tmp_path):
    report = run(RunConfig(backend=backend, algorithm="rpg", sparsity=0.9, out=str(tmp_path / "rpg"),
                           **dict(TINY, dense_epochs=0)), echo=lambda *a: None)
    assert abs(report["totals"]["prunable_sparsity"] - 0.9) < 1e-4
    assert report["run"]["target_sparsity"] == 0.9
    convs = [r for r in report["layers"] if r["kind"] == "conv"]
    assert all("rank" in r and r["rank"] >= 1 for r in convs)
    assert all("rank" not in r for r in report["layers"] if r["kind"] == "linear")
    plan = json.load(open(tmp_path / "rpg" / "plan.json"))
    assert plan["ranks"] == {r["name"]: r["rank"] for r in convs}


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_job_runs_trp_and_decomposes(backend, tmp_path):
    report = run(RunConfig(backend=backend, algorithm="trp", params={"energy": 0.5, "lam": 1e-3},
                           decompose_threshold=0.05, out=str(tmp_path / "trp"), **dict(TINY, dense_epochs=0)),
                 echo=lambda *a: None)
    dec = report["decomposition"]
    # the report describes the decomposed model: each decomposed conv became two layers
    names = {r["name"] for r in report["layers"]}
    for layer, rank in dec["ranks"].items():
        assert f"{layer}.0" in names and f"{layer}.1" in names and layer not in names
        first = next(r for r in report["layers"] if r["name"] == f"{layer}.0")
        assert first["weight_shape"][0] == rank
    assert report["totals"]["total_params"] == dec["params_after"]
    assert report["totals"]["dense_macs"] == dec["macs_after"]
    assert dec["flops_reduction"] == pytest.approx(dec["macs_before"] / dec["macs_after"])
    assert "after_decomposition" in report["accuracy"]
    assert "target_sparsity" not in report["run"]  # TRP has no sparsity target
