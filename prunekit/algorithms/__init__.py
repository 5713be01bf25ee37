"""Pruning algorithms, registered by name."""
from __future__ import annotations

from prunekit.errors import ConfigError
from prunekit.algorithms.base import Algorithm, apply_plan, check_finite_weights
from prunekit.algorithms.channel import ChannelConfig, ChannelPruner
from prunekit.algorithms.dsa import DSAConfig, DSAPruner
from prunekit.algorithms.magnitude import MagnitudeConfig, MagnitudePruner
from prunekit.algorithms.precrop import PreCropConfig, PreCropPruner
from prunekit.algorithms.rpg import RPGConfig, RPGPruner
from prunekit.algorithms.sdprun import SDPrunConfig, SDPrunPruner
from prunekit.algorithms.trp import TRPConfig, TRPPruner

ALGORITHMS = {"magnitude": MagnitudePruner, "rpg": RPGPruner, "trp": TRPPruner, "sdprun": SDPrunPruner,
              "dsa": DSAPruner, "precrop": PreCropPruner, "channel": ChannelPruner}
#: algorithms the project plans; named here so an error can tell "not yet" from "unknown"
PLANNED = ()


def make_algorithm(name: str, **config) -> Algorithm:
    key = str(name).lower()
    if key in ALGORITHMS:
        return ALGORITHMS[key](**config)
    if key in PLANNED:
        raise ConfigError(f"algorithm {name!r} is not implemented yet; available: {', '.join(sorted(ALGORITHMS))}")
    raise ConfigError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
