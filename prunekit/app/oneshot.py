"""One-shot structured pruning of a user's own model: :func:`prune_channels` (issue #11).

Prune a model's channel groups to a MACs (or channel) target and return the narrower dense
model, without training, in one call::

    import torchvision, prunekit
    model = torchvision.models.resnet18(weights="DEFAULT")
    small = prunekit.prune_channels(model, input_shape=(3, 224, 224), macs_kept=0.5)

It is the channel baseline's decision (:mod:`prunekit.algorithms.channel`: every setting of it
is accepted here, validated through the algorithm registry) followed by the backend's
compaction; the given model is left as it was (no mask is applied to it). The backend is found
from the model's class (the backend whose framework defines one of its base classes) unless
``backend`` names one. Importances that need gradients (``taylor``) need a training step and
are refused here: use the algorithm in a training loop (``PruningSession``) instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

from prunekit.algorithms.registry import make_algorithm
from prunekit.contract.backend import backend_specs, get_backend
from prunekit.decisions.channel_importance import NEEDS_GRADIENTS
from prunekit.errors import ConfigError, ModelError


def backend_for_model(model) -> str:
    """The name of the registered backend whose framework defines one of ``model``'s base
    classes; a :class:`ModelError` when none does."""
    roots = {c.__module__.split(".")[0] for c in type(model).__mro__}
    for spec in backend_specs():
        if spec.framework in roots:
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
