"""Pruning algorithms, registered by name."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Algorithm, apply_plan, check_finite_weights
from .magnitude import MagnitudeConfig, MagnitudePruner
from .rpg import RPGConfig, RPGPruner
from .trp import TRPConfig, TRPPruner

ALGORITHMS = {"magnitude": MagnitudePruner, "rpg": RPGPruner, "trp": TRPPruner}
#: algorithms the project plans; named here so an error can tell "not yet" from "unknown"
PLANNED = ("dsa", "sdprun", "precrop")


def make_algorithm(name: str, **config) -> Algorithm:
    key = str(name).lower()
    if key in ALGORITHMS:
        return ALGORITHMS[key](**config)
    if key in PLANNED:
        raise ConfigError(f"algorithm {name!r} is not implemented yet; available: {', '.join(sorted(ALGORITHMS))}")
    raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
