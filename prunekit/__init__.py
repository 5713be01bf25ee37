"""prunekit: neural-network pruning written once, run on PyTorch and MindSpore.

This package is the framework-neutral core: the tensor-op contract (:mod:`prunekit.contract.ops`),
selection rules, schedules, algorithms, pruning plans, FLOPs counting, reports and the CLI.
It never imports a framework; adapters live in the top-level ``backends`` package.
"""
from prunekit.errors import BackendUnavailable, ConfigError, DataError, ModelError, PlanError, PrunekitError
from prunekit.decisions.plan import PruningPlan

__version__ = "0.1.0"

__all__ = ["PruningPlan", "PrunekitError", "ConfigError", "ModelError", "PlanError", "DataError",
           "BackendUnavailable", "__version__"]
