"""Pruning algorithms, registered by name."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Algorithm, apply_plan, check_finite_weights
from .channel import ChannelConfig, ChannelPruner
from .dsa import DSAConfig, DSAPruner
from .magnitude import MagnitudeConfig, MagnitudePruner
from .precrop import PreCropConfig, PreCropPruner
from .rpg import RPGConfig, RPGPruner
from .sdprun import SDPrunConfig, SDPrunPruner
from .trp import TRPConfig, TRPPruner

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
