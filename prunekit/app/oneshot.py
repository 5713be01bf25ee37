"""One-shot structured pruning of a user's own model: :func:`prune_channels` (issue #11).

Prune a model's channel groups to a MACs (or channel) target and return the narrower dense
model, without training, in one call::

    small = prunekit.prune_channels(model, input_shape=(3, 224, 224), macs_kept=0.5)

(``model``: a network of a registered backend's framework, e.g. an ImageNet CNN; README has the
three lines for one zoo.)

It is the channel baseline's decision (:mod:`prunekit.algorithms.channel`: every setting of it
is accepted here, validated through the algorithm registry) followed by the backend's
compaction; the given model is left as it was (no mask is applied to it). The backend is the
one that owns the model (``Backend.owns_model``, asked of the backends whose framework this
process has imported) unless ``backend`` names one. Importances that need gradients (``taylor``) need a training step and
are refused here: use the algorithm in a training loop (``PruningSession``) instead.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from prunekit.algorithms.registry import make_algorithm
from prunekit.contract.backend import backend_specs, get_backend
from prunekit.decisions.channel_importance import NEEDS_GRADIENTS
from prunekit.errors import ConfigError, ModelError


def backend_for_model(model) -> str:
    """The name of the registered backend that owns ``model`` (``Backend.owns_model``); only
    backends whose framework is already imported are asked (a model implies its framework is
    loaded), so no other framework is imported. A :class:`ModelError` when none owns it."""
    for spec in backend_specs():
        if spec.framework in sys.modules and get_backend(spec.name).owns_model(model):
            return spec.name
    raise ModelError(f"no registered backend knows a model of type {type(model).__name__}; "
                     "pass backend= or wrap it with a backend's wrap()")


def prune_channels(model, input_shape: Sequence[int], macs_kept: Optional[float] = None,
                   backend: Optional[str] = None, return_handle: bool = False, **settings):
    """The compacted copy of ``model`` (a framework model) whose prunable layers keep at most
    ``macs_kept`` of their dense MACs (default 0.5), channels ranked by the channel baseline.

    ``input_shape``: one sample's (channels, height, width), for the probe and the MACs count.
    ``settings``: any other setting of the ``channel`` algorithm (``importance``,
    ``ignored_layers``, ``max_removed``, ``max_removed_by_layer``, ``round_to``, ``allocation``,
    or ``channels_removed`` instead of ``macs_kept``). ``return_handle``: return the backend's
    model handle of the compacted model (its layers and weights) instead of the bare model. Bad settings raise :class:`ConfigError` before the model is read;
    a model prunekit cannot prune or compact exactly is refused with a :class:`ModelError`."""
    if macs_kept is not None:
        settings["macs_kept"] = macs_kept
    algorithm = make_algorithm("channel", **settings)
    if algorithm.config.importance in NEEDS_GRADIENTS:
        raise ConfigError(f"importance {algorithm.config.importance!r} needs gradients from training; "
                          "prune_channels is one-shot: use the channel algorithm in a PruningSession")
    be = get_backend(backend if backend is not None else backend_for_model(model))
    handle = be.wrap(model, tuple(int(d) for d in input_shape), type(model).__name__)
    algorithm.bind(handle, 1)
    keep = algorithm.choose()
    small = be.compact(handle, keep)
    return small if return_handle else small.model
