"""The algorithm registry (prunekit/algorithms/registry.py) and the job-facing hooks of the base
Algorithm (prunekit/algorithms/base.py): one way to build every algorithm, one error line for a
wrong setting, and a job (prunekit/app/job.py) that knows no algorithm by name."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import prunekit.algorithms as algorithms
from prunekit.algorithms import (Algorithm, algorithm_class, algorithm_config, algorithm_names, make_algorithm,
                                 register_algorithm)
from prunekit.errors import ConfigError

SEVEN = ("magnitude", "rpg", "trp", "sdprun", "dsa", "precrop", "channel")
#: one non-default setting per algorithm
ONE_SETTING = {"magnitude": ("sparsity", 0.5), "rpg": ("lam", 0.25), "trp": ("energy", 0.8), "sdprun": ("mu", 0.6),
               "dsa": ("budget", 0.3), "precrop": ("score", "snip"), "channel": ("keep_ratio", 0.4)}
JOB = Path(__file__).resolve().parents[2] / "prunekit" / "app" / "job.py"


def test_the_seven_are_registered_in_order():
    assert tuple(algorithm_names()) == SEVEN
    for name in SEVEN:
        cls = algorithm_class(name)
        assert issubclass(cls, Algorithm) and cls.name == name
        assert algorithm_class(name.upper()) is cls


def test_every_algorithm_class_in_the_package_is_registered():
    registered = {algorithm_class(n) for n in algorithm_names()}
    for info in pkgutil.iter_modules(algorithms.__path__):
        module = importlib.import_module(f"prunekit.algorithms.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Algorithm) and cls is not Algorithm and cls.__module__ == module.__name__:
                assert cls in registered, f"{cls.__name__} is not registered"


@pytest.mark.parametrize("name", SEVEN)
def test_make_algorithm_builds_each_with_defaults(name):
    algo = make_algorithm(name)
    cls = algorithm_class(name)
    assert type(algo) is cls
    assert algo.config == cls.config_class()


@pytest.mark.parametrize("name", SEVEN)
def test_make_algorithm_takes_a_setting_or_a_config(name):
    key, value = ONE_SETTING[name]
    algo = make_algorithm(name, **{key: value})
    assert getattr(algo.config, key) == value
    config = algorithm_config(name, **{key: value})
    assert make_algorithm(name, config=config).config is config
    with pytest.raises(ConfigError, match="not both"):
        make_algorithm(name, config=config, **{key: value})
    other = next(n for n in SEVEN if n != name)
    with pytest.raises(ConfigError, match=algorithm_class(name).config_class.__name__):
        make_algorithm(name, config=algorithm_config(other))


def test_an_int_for_a_number_setting_becomes_a_float():
    algo = make_algorithm("rpg", lam=1)
    assert algo.config.lam == 1.0 and type(algo.config.lam) is float
    assert make_algorithm("magnitude", exclude="conv1").config.exclude == ("conv1",)


@pytest.mark.parametrize("name, key", [("dsa", "budgett"), ("rpg", "lamda"), ("precrop", "sparsty")])
def test_unknown_setting_names_algorithm_key_and_allowed_keys(name, key):
    with pytest.raises(ConfigError) as e:
        make_algorithm(name, **{key: 0.5})
    msg = str(e.value)
    assert f"unknown {name} setting(s) {key}; allowed: " in msg
    for allowed in algorithms.setting_types(name):
        assert allowed in msg


@pytest.mark.parametrize("name, key, value, expected", [
    ("rpg", "sparsity", "high", "a number"),
    ("dsa", "budget", True, "a number"),
    ("trp", "every", 2.5, "an integer"),
    ("precrop", "reinit", "yes", "true or false"),
    ("channel", "target", 3, "a string"),
    ("sdprun", "exclude", [1], "a name or a list of names"),
    ("magnitude", "frequency", "often", "an integer"),
])
def test_wrong_type_names_key_value_and_type(name, key, value, expected):
    with pytest.raises(ConfigError) as e:
        make_algorithm(name, **{key: value})
    assert str(e.value) == f"{name} setting {key!r} must be {expected}, got {value!r}"


def test_unknown_algorithm_is_named():
    with pytest.raises(ConfigError, match="unknown algorithm 'bogus'; available: channel, dsa"):
        make_algorithm("bogus")


def test_register_refuses_a_clash_and_a_class_without_config():
    class Clash(Algorithm):
        name = "rpg"
        config_class = algorithm_class("trp").config_class

    class NoConfig(Algorithm):
        name = "noconfig"

    with pytest.raises(ConfigError, match="taken"):
        register_algorithm(Clash)
    with pytest.raises(ConfigError, match="config_class"):
        register_algorithm(NoConfig)
    assert tuple(algorithm_names()) == SEVEN


# ----------------------------------------------------------------------------- the hooks
HOOKS = ("name", "config_class", "prunes_at_init", "scoring_batches", "prepare", "training_algorithm",
         "held_out_fraction", "validation", "trainer_overrides", "channel_keep", "final_transform", "ranks",
         "target_sparsity")


def test_base_defaults_and_documentation():
    base = Algorithm()
    model = object()
    assert base.prunes_at_init is False and base.config_class is None
    assert base.scoring_batches == 1
    assert base.prepare(model, backend=None) is model
    assert base.training_algorithm() is base
    assert base.held_out_fraction is None and base.validation is None
    assert base.trainer_overrides() == {}
    assert base.channel_keep == {}
    assert base.final_transform(model, None, 0.05) is None
    assert base.ranks is None and base.target_sparsity is None
    for hook in HOOKS:
        assert hook in Algorithm.__doc__, f"{hook} is not documented among the job-facing hooks"


def test_algorithms_override_the_hooks_they_need():
    overrides = {name: {h for h in HOOKS if h in vars(algorithm_class(name))} for name in SEVEN}
    assert "prunes_at_init" in overrides["precrop"] and "scoring_batches" in overrides["precrop"]
    assert "final_transform" in overrides["trp"]
    assert "held_out_fraction" in overrides["dsa"]
    assert "trainer_overrides" in overrides["sdprun"]
    precrop = make_algorithm("precrop", batches=3)
    assert precrop.prunes_at_init and precrop.scoring_batches == 3 and precrop.target_sparsity is None
    assert make_algorithm("precrop", structure="unstructured", sparsity=0.7).target_sparsity == 0.7
    assert make_algorithm("dsa", val_fraction=0.2).held_out_fraction == 0.2
    assert make_algorithm("sdprun", lr=0.05).trainer_overrides()["lr"] == 0.05
    assert make_algorithm("magnitude", sparsity=0.6).target_sparsity == 0.6
    assert make_algorithm("rpg", sparsity=0.8).target_sparsity == 0.8
    for name in ("trp", "sdprun", "dsa", "channel"):
        assert make_algorithm(name).target_sparsity is None
    for name in SEVEN:
        assert algorithm_class(name).prunes_at_init == (name == "precrop")
        assert (make_algorithm(name).held_out_fraction is None) == (name != "dsa")


# ----------------------------------------------------------------------------- the job names none
def _job_tree():
    return ast.parse(JOB.read_text())


def test_job_names_no_algorithm():
    names = {n.lower() for n in algorithm_names()}
    literals = [node.value for node in ast.walk(_job_tree())
                if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [s for s in literals if s.lower() in names]


def test_job_imports_no_specific_algorithm_module():
    for node in ast.walk(_job_tree()):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("prunekit.algorithms."), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("prunekit.algorithms.") for a in node.names)


def test_job_probes_no_algorithm_with_getattr_or_hasattr():
    for node in ast.walk(_job_tree()):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0])
            assert node.func.id == "getattr" and target in ("self", "cfg"), \
                f"line {node.lineno}: {node.func.id}({target}, ...) probes something other than the run config"


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("setting, message", [
    ("budgett=0.5", "unknown dsa setting(s) budgett; allowed: "),
    ("budget=half", "dsa setting 'budget' must be a number, got 'half'"),
])
def test_cli_set_uses_the_registry_checks(setting, message, tmp_path, capsys):
    from prunekit.app.cli import main

    out = tmp_path / "out"
    assert main(["run", "--algorithm", "dsa", "--set", setting, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_list_shows_the_registry(capsys):
    from prunekit.app.cli import main

    assert main(["list"]) == 0
    assert "algorithms: " + ", ".join(SEVEN) in capsys.readouterr().out
