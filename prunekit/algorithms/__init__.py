"""Pruning algorithms, registered by name (:mod:`prunekit.algorithms.registry`).

Importing this package registers the built-in algorithms, in the order ``prunekit list`` shows.
"""
from __future__ import annotations

from prunekit.algorithms.base import Algorithm, FinalTransform, apply_plan, check_finite_weights
from prunekit.algorithms.registry import (DEFAULT_ALGORITHM, PLANNED, algorithm_class, algorithm_config,
                                          algorithm_names, make_algorithm, register_algorithm, setting_types)
from prunekit.algorithms.magnitude import MagnitudeConfig, MagnitudePruner
from prunekit.algorithms.rpg import RPGConfig, RPGPruner
from prunekit.algorithms.trp import TRPConfig, TRPPruner
from prunekit.algorithms.sdprun import SDPrunConfig, SDPrunPruner
from prunekit.algorithms.dsa import DSAConfig, DSAPruner
from prunekit.algorithms.precrop import PreCropConfig, PreCropPruner
from prunekit.algorithms.channel import ChannelConfig, ChannelPruner
