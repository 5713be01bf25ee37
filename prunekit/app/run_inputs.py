"""What a run takes from its user beyond the reference set-up: the model source (``--model``,
``model_args``), ``--num-classes``, ``--input-size``, ``--weights``, and the image-folder data
set's options (``val_fraction``, ``normalization``). The job (:mod:`prunekit.app.job`) calls
these steps in order:

1. :func:`check_settings` (in ``RunConfig.validate``): every value checked, nothing read;
2. :func:`preflight` (once the backend is known, before data are read): the model source's package
   is imported and the name looked up;
3. :func:`load_data`: the data set, with the folder options and a stated normalisation;
4. :func:`build_model`: the model on the backend, its output width checked against the classes,
   the user's weights checked against it and loaded before training starts;
5. :func:`run_info`: what the report records so that exports rebuild the model (geometry,
   ``model_args``, the class names of a folder data set).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

import numpy as np

from prunekit.app import data as datasets
from prunekit.app.image_folder import parse_normalization
from prunekit.app.model_sources import build_handle, parse_model
from prunekit.app.user_weights import check_weights_path, load_weights_file
from prunekit.errors import ConfigError, ModelError

#: data set -> its fixed image size (the folder data set's is ``input_size``)
NATIVE_SIZE = {"cifar10": 32, "mnist": 28, "fashion_mnist": 28}


def check_settings(cfg) -> None:
    """Validate the model and input settings of ``cfg`` (a ``RunConfig``; ``cfg.model`` is
    normalised in place). Reads no file."""
    source = parse_model(cfg.model, cfg.backend)
    cfg.model = source.text
    if not isinstance(cfg.model_args, Mapping):
        raise ConfigError(f"model_args must be a mapping of keyword arguments, got {cfg.model_args!r}")
    if cfg.model_args and source.is_reference:
        raise ConfigError(f"model_args {dict(cfg.model_args)} are for source and factory models; reference model "
                          f"{source.text!r} takes none")
    for key in ("num_classes", "input_size"):
        v = getattr(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (2 if key == "num_classes" else 8)):
            raise ConfigError(f"{key} must be an integer >= {2 if key == 'num_classes' else 8} or None, got {v!r}")
    native = NATIVE_SIZE.get(cfg.dataset)
    if native is not None and cfg.input_size not in (None, native):
        raise ConfigError(f"input_size {cfg.input_size}: {cfg.dataset} images are {native}x{native}; "
                          "input_size resizes the folder data set only")
    if not isinstance(cfg.val_fraction, (int, float)) or isinstance(cfg.val_fraction, bool) \
            or not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    parse_normalization(cfg.normalization)
    if cfg.weights is not None:
        check_weights_path(cfg.weights, cfg.backend)


def preflight(backend, cfg) -> None:
    """Look the model up on ``backend`` (imports its package) before any data are read."""
    source = parse_model(cfg.model, backend.name)
    if not source.is_reference:
        backend.check_model_source(source)


def load_data(cfg, progress: bool = True):
    """The run's data set; a stated ``normalization`` replaces the data set's statistics."""
    options = {}
    if cfg.dataset == "folder":
        options = {"image_size": cfg.input_size, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                   "normalization": cfg.normalization, "progress": progress}
    ds = datasets.load_dataset(cfg.dataset, root=cfg.data_root, train_limit=cfg.train_limit,
                               test_limit=cfg.test_limit, **options)
    if cfg.dataset != "folder" and cfg.normalization is not None:
        stats = parse_normalization(cfg.normalization)
        if stats is not None:
            if len(stats[0]) != ds.in_channels:
                raise ConfigError(f"normalization {cfg.normalization!r} gives {len(stats[0])} channel(s); "
                                  f"{cfg.dataset} has {ds.in_channels}")
            ds = dataclasses.replace(ds, mean=stats[0], std=stats[1])
    if cfg.num_classes is not None and cfg.num_classes != ds.num_classes:
        raise ConfigError(f"num_classes {cfg.num_classes}: the {cfg.dataset} data set has {ds.num_classes} classes")
    return ds


def build_model(backend, cfg, ds, echo=print):
    """The run's model on ``backend`` for ``ds``, holding ``cfg.weights`` when given (checked first)."""
    handle = build_handle(backend, cfg.model, ds.num_classes, ds.in_channels, ds.image_size, seed=cfg.seed,
                          device=cfg.device, model_args=cfg.model_args)
    out = np.asarray(handle.predict(np.zeros((1,) + tuple(handle.input_shape), np.float32)))
    if out.shape != (1, ds.num_classes):
        raise ModelError(f"model {cfg.model!r} gives outputs of shape {out.shape[1:]} per image; the "
                         f"{cfg.dataset} data set needs {ds.num_classes} class scores (set num_classes in model_args?)")
    if cfg.weights:
        loaded = load_weights_file(backend, handle, cfg.weights)
        echo(f"weights: {loaded['entries']} entries from {cfg.weights}")
    return handle


def run_info(cfg, ds) -> Dict[str, Any]:
    """Report entries that let an export rebuild the model: the geometry, ``model_args``, the
    weights the run started from, and a folder data set's class names."""
    info: Dict[str, Any] = {"num_classes": int(ds.num_classes), "in_channels": int(ds.in_channels),
                            "image_size": int(ds.image_size)}
    if cfg.model_args:
        info["model_args"] = dict(cfg.model_args)
    if cfg.weights:
        info["weights"] = cfg.weights
    if getattr(ds, "classes", None):
        info["classes"] = list(ds.classes)
    return info
