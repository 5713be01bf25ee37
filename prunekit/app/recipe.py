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
key and what it allows; ``params`` are checked as ``--set`` settings are (the algorithm
registry, :mod:`prunekit.algorithms.registry`). Command-line flags given next to ``--recipe``
override the recipe.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, Mapping, Optional

from prunekit.algorithms.registry import check_value
from prunekit.app.job import RunConfig
from prunekit.errors import ConfigError


def _field_types() -> Dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def config_from_mapping(recipe: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """A validated :class:`RunConfig` from a recipe mapping, then ``overrides`` on top."""
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"a recipe must be a mapping of settings, got {type(recipe).__name__}")
    types = _field_types()
    values: Dict[str, Any] = {}
    for key, value in recipe.items():
        if key not in types:
            raise ConfigError(f"unknown recipe key {key!r}; allowed: {', '.join(sorted(types))}")
        values[key] = check_value(f"recipe key {key!r}", value, types[key])
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
