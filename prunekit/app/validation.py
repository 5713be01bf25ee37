"""Up-front checks of a run's settings, whichever way they came (command line, recipe, Python API).

:func:`check_run_config` runs from ``RunConfig.validate``, before any data is read or any file is
written, and refuses a bad setting with one :class:`~prunekit.errors.ConfigError` naming the key,
the value and what is allowed:

* every field's type, from ``RunConfig``'s type hints (a string where a number belongs, a float
  epoch count, ...), so the Python API names the key as the command line does instead of a raw
  ``TypeError`` from deep inside;
* ranges: learning rate > 0, momentum in [0, 1), weight decay >= 0, all finite; ``end_fraction``
  in (0, 1]; ``frequency`` >= 1; seed >= 0; the run-level choices (schedule, granularity, scope,
  optimizer) whether or not the chosen algorithm uses them;
* the device, by the backend (``Backend.check_device``: ``cuda`` without a GPU is refused now,
  not after the data is loaded);
* the output folder (:func:`check_out_folder`): not a file, creatable and writable, and not the
  folder of another run unless ``resume`` or ``overwrite`` says what to do with it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import typing
from typing import Any

from prunekit.algorithms.registry import check_value
from prunekit.decisions.schedules import SCHEDULES
from prunekit.errors import ConfigError

#: files whose presence marks a folder as holding a run's results (or a run in progress)
RUN_FILES = ("report.json", "report.md", "weights.npz", "plan.json", "plan.npz", os.path.join("checkpoint", "state.npz"))
GRANULARITIES = ("unstructured", "channel")
SCOPES = ("global", "layer")


def check_types(cfg: Any) -> None:
    """Every field of the dataclass ``cfg`` against its type hint (normalised in place: an int
    where a float belongs becomes a float; a path object for ``out``/``data_root`` a string)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        setattr(cfg, f.name, check_value(f"setting {f.name!r}", value, hints[f.name]))


def _number(key: str, value: float, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = True, what: str = "") -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if math.isfinite(high) else "inf)"
        raise ConfigError(f"{key} must be a finite number in {lo}, {hi}{what}, got {value!r}")


def _choice(key: str, value: str, allowed) -> None:
    if value is not None and value not in allowed:  # None: the algorithm's own default
        raise ConfigError(f"unknown {key} {value!r}; expected one of {', '.join(allowed)}")


def check_run_config(cfg: Any) -> None:
    """The checks of this module's docstring on a ``RunConfig`` (types first, then ranges, the
    device and the output folder). Raises :class:`ConfigError`; changes nothing on disk."""
    from prunekit.app.session import OPTIMIZERS

    check_types(cfg)
    _number("lr", cfg.lr, 0.0, low_open=True)
    _number("momentum", cfg.momentum, 0.0, 1.0)
    _number("weight_decay", cfg.weight_decay, 0.0)
    if cfg.end_fraction is not None:  # None: the algorithm's own default
        _number("end_fraction", cfg.end_fraction, 0.0, 1.0, low_open=True, high_open=False)
    if cfg.decompose_threshold is not None:
        _number("decompose_threshold", cfg.decompose_threshold, 0.0)
    if cfg.frequency is not None and cfg.frequency < 1:
        raise ConfigError(f"frequency must be a positive number of steps (or unset: 10 updates), got {cfg.frequency!r}")
    if cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    for key in ("train_limit", "test_limit"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be a positive number of images, or 'all' (None) for the whole set; "
                              f"got {v!r}")
    if cfg.train_limit is not None and cfg.train_limit < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than train_limit {cfg.train_limit}: "
                          "not one full training batch; lower batch_size or raise train_limit")
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("granularity", cfg.granularity, GRANULARITIES)
    _choice("scope", cfg.scope, SCOPES)
    if str(cfg.optimizer).lower() not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if not cfg.out.strip():
        raise ConfigError("out must name a folder, got an empty string")
    if cfg.data_root is not None and not os.path.isdir(cfg.data_root):
        raise ConfigError(f"data_root {cfg.data_root!r} is not a folder")


def check_device(backend_name: str, device) -> None:
    """The backend's own device check (``Backend.check_device``), for a device other than None."""
    if device is None:
        return
    from prunekit.contract.backend import get_backend

    get_backend(backend_name).check_device(device)


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds a run's results or checkpoint (:data:`RUN_FILES`)."""
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def check_out_folder(out: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that is a file, cannot be created or written, or holds another
    run while neither ``resume`` nor ``overwrite`` is set (``resume`` and ``overwrite`` together
    are refused too: one continues that run, the other replaces it)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: --resume continues the run in out, "
                          "--overwrite replaces it")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"out {out!r} is a file, not a folder; name a folder for the run's results")
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"out {out!r} cannot be created: {probe} is a file, not a folder")
    read_only = bool(getattr(os, "ST_RDONLY", 0)) and bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out {out!r} is not writable ({probe} does not allow this user to write)")
    if os.path.isdir(path) and holds_run(path) and not resume and not overwrite:
        raise ConfigError(f"out {out!r} already holds a run (report, weights, plan or checkpoint); "
                          "pass --overwrite (overwrite: true) to replace it, --resume to continue it, "
                          "or name another folder")


def check_run_environment(cfg: Any) -> None:
    """What a validated ``RunConfig`` needs of this machine: its device and its output folder.
    With ``overwrite``, the other run's checkpoint folder is removed afterwards (so that a
    later ``--resume`` cannot pick up a checkpoint of the run being replaced)."""
    check_device(cfg.backend, cfg.device)
    check_out_folder(cfg.out, cfg.resume, cfg.overwrite)
    if cfg.overwrite:
        shutil.rmtree(os.path.join(cfg.out, "checkpoint"), ignore_errors=True)

