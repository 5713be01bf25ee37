"""Resuming runs whose algorithm decides at initialization (PreCropping and the like).

Such a run's checkpoint holds the model its decision built (a narrower dense model, or the
masked one), which the freshly built model of a resumed run cannot load. The resumed run
therefore rebuilds the untrained model from the same seed, scores it on the same batches, and
so re-makes the decision; :func:`resume_at_init` then refuses the checkpoint unless that
decision is exactly the one recorded in it (:func:`init_decision`, saved by
:class:`prunekit.app.run_state.RunProgress` under ``decision``), and only then loads the saved
weights and random states onto the model the decision built.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from prunekit.app import checkpoint as ckpt


def init_decision(algorithm) -> Dict[str, dict]:
    """The decision of an at-initialization algorithm as arrays: kept channel indices per group
    and the fixed masks per layer (from its plan)."""
    plan = algorithm.plan()
    return {"kept_channels": {g: np.asarray(v, np.int64) for g, v in sorted(plan.kept_channels.items())},
            "masks": {n: np.asarray(m, bool) for n, m in sorted(plan.masks.items())}}


def same_decision(a: dict, b: dict) -> bool:
    for part in ("kept_channels", "masks"):
        x, y = a.get(part) or {}, b.get(part) or {}
        if sorted(x) != sorted(y):
            return False
        if any(np.shape(x[k]) != np.shape(y[k]) or not np.array_equal(x[k], y[k]) for k in x):
            return False
    return True


def resume_at_init(saved: dict, handle, decision: dict, backend) -> None:
    """Check the re-made ``decision`` against the checkpoint's, then load its weights (onto
    ``handle``, the model the decision built) and its random states."""
    recorded = saved.get("decision")
    if not isinstance(recorded, dict) or not same_decision(recorded, decision):
        raise ckpt.CheckpointError("the checkpoint's decision at initialization differs from the one this run "
                                   "re-made from the same seed and data (or the checkpoint has none); refusing "
                                   "to resume")
    handle.load_state_numpy(saved["model"])
    backend.set_rng_state(saved["rng"]["framework"])
    ckpt.set_host_rng_state(saved["rng"]["host"])
