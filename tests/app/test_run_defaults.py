"""``prunekit run`` builds each algorithm from its own defaults (no job-wide value replaces one),
applies only what the user sets, and the report records and prints every effective setting."""
import dataclasses
import json

import pytest

from prunekit.algorithms import algorithm_class, algorithm_names
from prunekit.app.cli import main
from prunekit.app.job import RunConfig, run

TINY = dict(backend="torch", model="mnist_cnn", dataset="mnist", train_limit=64, test_limit=32, dense_epochs=0,
            prune_epochs=1, batch_size=32, progress=False, latency_batch=0)


@pytest.mark.parametrize("name", algorithm_names())
def test_a_run_config_left_alone_gives_the_algorithms_own_defaults(name):
    own = dataclasses.asdict(algorithm_class(name).config_class())
    assert dataclasses.asdict(RunConfig(algorithm=name).algorithm_kwargs()["config"]) == own


def test_run_records_the_defaults_and_an_override(tmp_path):
    printed = []
    report = run(RunConfig(algorithm="rpg", out=str(tmp_path / "defaults"), **TINY), echo=printed.append)
    own = json.loads(json.dumps(dataclasses.asdict(algorithm_class("rpg").config_class())))
    assert report["algorithm_config"] == own
    assert report["algorithm_config"]["end_fraction"] == 0.8 and report["algorithm_config"]["frequency"] == 100
    text = "\n".join(str(p) for p in printed)
    assert "rpg settings: " in text and "end_fraction=0.8" in text and "frequency=100" in text
    saved = json.loads((tmp_path / "defaults" / "report.json").read_text())
    assert saved["algorithm_config"] == own

    out = tmp_path / "override"
    argv = ["run", "--algorithm", "rpg", "--end-fraction", "0.5", "--set", "lam=0.25", "--out", str(out)]
    for key, value in TINY.items():
        if key == "progress":
            argv.append("--no-progress")
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["algorithm_config"] == {**own, "end_fraction": 0.5, "lam": 0.25}
    assert "| end_fraction | 0.5 |" in (out / "report.md").read_text()


def test_a_common_setting_the_algorithm_lacks_is_named(tmp_path):
    cfg = RunConfig(algorithm="trp", sparsity=0.5)
    assert cfg.ignored_settings() == ["sparsity"]
    assert not RunConfig(algorithm="rpg", sparsity=0.5).ignored_settings()
