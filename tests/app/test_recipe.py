"""Recipes: every example recipe validates; bad recipes are refused naming the key; flags override."""
import glob
import os

import pytest

from prunekit.app.cli import main
from prunekit.errors import ConfigError
from prunekit.app.recipe import config_from_mapping, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/<file>
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml")))


def test_there_is_a_recipe_per_algorithm_and_backend():
    names = {os.path.basename(p)[:-5] for p in RECIPES}
    for algorithm in ("magnitude", "rpg", "trp"):
        for backend in ("torch", "mindspore"):
            assert f"{algorithm}-{backend}" in names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_example_recipes_validate(path):
    cfg = load_recipe(path)
    algorithm, backend = os.path.basename(path)[:-5].split("-")
    assert cfg.algorithm == algorithm and cfg.backend == backend
    cfg.algorithm_kwargs()  # the algorithm's own checks accept the params


@pytest.mark.parametrize("recipe, message", [
    ({"modle": "resnet20"}, "unknown recipe key 'modle'; allowed: "),
    ({"prune_epochs": "three"}, "'prune_epochs' must be an integer"),
    ({"sparsity": "high"}, "'sparsity' must be a number"),
    ({"sparsity": 1.5}, "sparsity must be in [0, 1)"),
    ({"augment": "yes"}, "'augment' must be true or false"),
    ({"algorithm": "rpg", "params": {"partial_k": 2}}, "partial_k must be in (0, 1)"),
    ({"algorithm": "rpg", "params": {"lamda": 2}}, "unknown rpg setting(s) lamda; allowed: "),
    ({"algorithm": "trp", "params": "scheme=channel"}, "'params' must be a mapping"),
    ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
])
def test_bad_recipes_name_the_key(recipe, message):
    with pytest.raises(ConfigError) as e:
        config_from_mapping(recipe)
    assert message in str(e.value)


def test_flags_override_the_recipe(tmp_path):
    path = os.path.join(ROOT, "examples", "recipes", "rpg-mindspore.yaml")
    cfg = load_recipe(path, {"prune_epochs": 1, "params": {"lam": 0.25}})
    assert cfg.prune_epochs == 1 and cfg.params["lam"] == 0.25 and cfg.params["partial_k"] == 0.1
    assert cfg.backend == "mindspore"


def test_cli_runs_a_recipe_with_overrides(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["run", "--recipe", os.path.join(ROOT, "examples", "recipes", "trp-torch.yaml"),
                   "--prune-epochs", "1", "--train-limit", "100", "--test-limit", "50", "--batch-size", "50",
                   "--out", str(out), "--no-progress", "--set", "energy=0.5"])
    assert status == 0
    text = capsys.readouterr().out
    assert "decomposition (channel" in text
    assert (out / "report.json").exists()


def test_cli_reports_a_bad_recipe_without_writing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet20\nepochs: 3\nout: " + str(tmp_path / "out") + "\n")
    assert main(["run", "--recipe", str(bad)]) == 2
    assert "unknown recipe key 'epochs'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["run", "--recipe", str(tmp_path / "missing.yaml")]) == 2
