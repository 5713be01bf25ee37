"""prunekit: neural-network pruning written once, run on PyTorch and MindSpore.

This package is the framework-neutral core: the tensor-op contract (:mod:`prunekit.contract.ops`),
selection rules, schedules, algorithms, pruning plans, FLOPs counting, reports and the CLI.
It never imports a framework; adapters live in the top-level ``backends`` package.
"""
from prunekit.errors import BackendUnavailable, ConfigError, DataError, ModelError, PlanError, PrunekitError
from prunekit.decisions.plan import PruningPlan

__version__ = "0.1.0"


def __getattr__(name):
    # the one-shot path sits in the app layer; imported on first use so ``import prunekit`` stays light
    if name == "prune_channels":
        from prunekit.app.oneshot import prune_channels
        return prune_channels
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


__all__ = ["prune_channels", "PruningPlan", "PrunekitError", "ConfigError", "ModelError", "PlanError", "DataError",
           "BackendUnavailable", "__version__"]
