"""Run figures (PNG), the measured trajectory in report.json, the progress bar's postfix, and
``prunekit compare`` across runs."""
import json
import math
import os

import numpy as np
import pytest

from prunekit.app.cli import main
from prunekit.app.job import RunConfig, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(backend="torch", model="mnist_cnn", dataset="mnist", train_limit=128, test_limit=64, batch_size=32,
            dense_epochs=1, prune_epochs=2, checkpoint_every=0)


def _assert_png(path, min_pixels=100):
    assert os.path.exists(path), path
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    import matplotlib.image

    image = matplotlib.image.imread(path)  # decodes the whole file
    assert image.shape[0] >= min_pixels and image.shape[1] >= min_pixels
    assert float(np.ptp(image[..., :3])) > 0  # something is drawn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, algorithm, sparsity in (("rpg-80", "rpg", 0.8), ("magnitude-50", "magnitude", 0.5)):
        # frequency 1: masks move every step of this 8-step phase (the algorithms' own 100 would move them once)
        report = run(RunConfig(algorithm=algorithm, sparsity=sparsity, frequency=1, out=str(base / name), progress=False,
                               **TINY),
                     echo=lambda *a: None)
        out[name] = (base / name, report)
    return out


def test_run_writes_pngs_and_embeds_them_in_the_markdown(runs):
    folder, report = runs["rpg-80"]
    assert report["figures"] == {"layers": "layers.png", "trajectory": "trajectory.png"}
    for name in report["figures"].values():
        _assert_png(folder / name)
    md = (folder / "report.md").read_text()
    assert "![layers](layers.png)" in md and "![trajectory](trajectory.png)" in md
    assert not (folder / "checkpoint").exists()  # checkpoint_every=0: none written


def test_trajectory_is_measured_from_the_masks(runs):
    folder, report = runs["rpg-80"]
    saved = json.load(open(folder / "report.json"))
    traj = saved["trajectory"]
    steps = [p["step"] for p in traj]
    assert steps == sorted(steps) and steps[-1] == saved["run"]["steps"]
    # the last point (after the algorithm's final decisions) is the sparsity measured from the weights
    assert traj[-1]["phase"] == "final"
    assert abs(traj[-1]["sparsity"] - saved["totals"]["prunable_sparsity"]) < 1e-9
    assert all(p["sparsity"] == 0.0 for p in traj if p["phase"] == "dense")
    prune = [p for p in traj if p["phase"] == "prune"]
    assert any(0.0 < p["sparsity"] < 0.79 for p in prune)  # measured along the way, not the target
    assert all("mean_rank" in p for p in prune)
    conv_ranks = [r["rank"] for r in saved["layers"] if "rank" in r]
    assert abs(traj[-1]["mean_rank"] - sum(conv_ranks) / len(conv_ranks)) < 1e-9
    assert all(math.isfinite(p["loss"]) and 0.0 <= p["train_accuracy"] <= 1.0 for p in traj if "loss" in p)


def test_layer_bars_without_ranks(runs):
    folder, report = runs["magnitude-50"]
    assert "rank" not in report["layers"][0]
    _assert_png(folder / "layers.png")
    assert "mean_rank" not in report["trajectory"][-1]


def test_progress_bar_shows_loss_accuracy_and_sparsity(tmp_path, capsys):
    run(RunConfig(algorithm="magnitude", sparsity=0.5, out=str(tmp_path / "bar"), progress=True,
                  **dict(TINY, dense_epochs=0, prune_epochs=1)), echo=lambda *a: None)
    err = capsys.readouterr().err
    assert "pruning (magnitude)" in err
    assert "loss=" in err and "acc=" in err and "sparsity=" in err


@pytest.mark.parametrize("axis", ["sparsity", "flops"])
def test_compare_plots_accuracy_against_measured_sparsity_or_flops(runs, tmp_path, capsys, axis):
    png = tmp_path / f"comparison-{axis}.png"
    folders = [str(runs[k][0]) for k in sorted(runs)]
    assert main(["compare", *folders, "--out", str(png), "--x", axis]) == 0
    _assert_png(png)
    printed = capsys.readouterr().out
    for name, (_, report) in runs.items():
        value = report["totals"]["prunable_sparsity" if axis == "sparsity" else "effective_macs"]
        assert f"{name} ({report['run']['algorithm']}, torch): {axis} {value:.4g}" in printed
        assert f"test accuracy {report['accuracy']['after_pruning']:.2%}" in printed


def test_compare_refuses_a_folder_without_report(runs, tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    png = tmp_path / "c.png"
    assert main(["compare", str(runs["rpg-80"][0]), str(empty), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert f"{empty} has no report.json" in err
    assert not png.exists()
    assert main(["compare", str(tmp_path / "missing"), "--out", str(png)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not png.exists()
