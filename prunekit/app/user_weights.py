"""``--weights FILE``: start a run from a user's trained weights, checked against the model first.

Two kinds of file are read:

* the backend's own format (the suffixes of its :class:`~prunekit.contract.backend.BackendSpec`,
  ``weight_suffixes``; e.g. a state_dict file, or a checkpoint), named as that framework names a
  model's state, read by :meth:`~prunekit.contract.backend.Backend.read_weights` without running
  code from the file;
* a ``.npz`` of arrays under prunekit's shared names (a run's ``weights.npz``), on any backend.

Every entry of the model must be in the file with its shape, and the file must hold nothing
else: otherwise one :class:`~prunekit.errors.ModelError` names the missing, unexpected and
mis-shaped entries, and the model is left as it was. :func:`check_weights_path` checks the path
and its suffix before anything is read.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Mapping, Tuple

import numpy as np

from prunekit.contract.backend import backend_spec, backend_specs
from prunekit.errors import ConfigError, ModelError

SHARED_SUFFIX = ".npz"
_SHOWN = 4


def check_weights_path(path: str, backend: str) -> str:
    """``path`` if it is a file this backend's run can start from, else :class:`ConfigError`
    naming the file and the formats allowed (reads nothing)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"weights must be a file name, got {path!r}")
    spec = backend_spec(backend)
    allowed = tuple(spec.weight_suffixes) + (SHARED_SUFFIX,)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in allowed:
        other = next((s for s in backend_specs() if suffix in s.weight_suffixes), None)
        hint = (f"; {suffix} is a {other.title or other.name} file, read by backend {other.name!r}" if other else "")
        raise ConfigError(f"weights {path!r}: backend {spec.name!r} reads {', '.join(allowed)} files{hint}")
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path} does not exist")
    return path


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"weights {path}: not a readable .npz of arrays: {e}") from None


def check_entries(expected: Mapping[str, Tuple[int, ...]], given: Mapping[str, np.ndarray], path: str,
                  model: str) -> None:
    """Raise :class:`ModelError` naming the entries of ``expected`` (name -> shape) that ``given``
    lacks, the entries it has in excess and those of another shape."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} (file {tuple(np.shape(v))}, model {tuple(expected[k])})" for k, v in given.items()
                 if k in expected and tuple(np.shape(v)) != tuple(expected[k])]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}")
    if problems:
        raise ModelError(f"weights {path} do not fit model {model!r} ({len(expected)} entries): " + "; ".join(problems))


def load_weights_file(backend, handle, path: str) -> Dict[str, int]:
    """Check ``path`` against ``handle``'s model and load it; returns ``{"entries": n}``."""
    check_weights_path(path, backend.name)
    if path.lower().endswith(SHARED_SUFFIX):
        given = _read_npz(path)
        expected = {k: shape for k, (shape, _) in handle.state_shapes().items()}
        check_entries(expected, given, path, handle.model_name)
        handle.load_state_numpy(given)
    else:
        given = backend.read_weights(path)
        check_entries(backend.native_state_shapes(handle), given, path, handle.model_name)
        backend.load_weights(handle, given)
    return {"entries": len(given)}
