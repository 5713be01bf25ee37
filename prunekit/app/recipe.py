"""Recipes: a whole run described in a YAML file, validated before anything runs.

A recipe is a flat mapping of :class:`prunekit.app.job.RunConfig` fields, with the algorithm's own
hyperparameters under ``params``::

    backend: mindspore
    model: resnet20
    dataset: cifar10
    algorithm: rpg
    sparsity: 0.95
    params: {partial_k: 0.1, lam: 0.5}
    prune_epochs: 30
    out: runs/rpg-95

An unknown key, a value of the wrong type or out of range is refused with an error naming the
key and what it allows. Command-line flags given next to ``--recipe`` override the recipe.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, Mapping, Optional

from prunekit.errors import ConfigError
from prunekit.app.job import RunConfig


def _field_types() -> Dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"recipe key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"recipe key {key!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"recipe key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"recipe key {key!r} must be a string, got {value!r}")
        return value
    if origin in (dict, Dict) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"recipe key {key!r} must be a mapping of settings, got {value!r}")
        return dict(value)
    return value


def config_from_mapping(recipe: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """A validated :class:`RunConfig` from a recipe mapping, then ``overrides`` on top."""
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"a recipe must be a mapping of settings, got {type(recipe).__name__}")
    types = _field_types()
    values: Dict[str, Any] = {}
    for key, value in recipe.items():
        if key not in types:
            raise ConfigError(f"unknown recipe key {key!r}; allowed: {', '.join(sorted(types))}")
        values[key] = _check_type(key, value, types[key])
    for key, value in (overrides or {}).items():
        if key == "params":
            values["params"] = {**values.get("params", {}), **value}
        else:
            values[key] = value
    return RunConfig(**values).validate()


def load_recipe(path: str, overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    return config_from_mapping(recipe or {}, overrides)
