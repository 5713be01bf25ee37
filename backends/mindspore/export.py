"""Exports of MindSpore models: MindIR, and MindSpore checkpoints that either backend reloads.

* :func:`export_mindir` writes a MindIR file (``mindspore.export(..., file_format="MINDIR")``,
  batch axis dynamic), loads it back with ``mindspore.load`` + ``nn.GraphCell`` and compares its
  outputs on a check batch with the Cell's own before the file is put in place.
* :func:`save_checkpoint` writes a ``.ckpt`` (``mindspore.save_checkpoint``) under MindSpore's
  own parameter names (``bn1.gamma``, ``bn1.moving_mean``, ``layer1.0.conv1.0.weight``: each
  parameter's path in the Cell, which is its ``Parameter.name`` in a freshly built model, so
  ``mindspore.load_param_into_net`` works on it too), plus the structure description next to it
  (:class:`prunekit.app.export.ModelStructure`). :func:`load_checkpoint` rebuilds the model,
  decomposed or compacted, from that description and loads every parameter, names and shapes
  checked. A PyTorch model becomes a ``.ckpt`` through the same code: its shared-name state is
  loaded into the rebuilt MindSpore twin, which is saved.

:func:`export` is the entry point of ``prunekit export`` (:func:`prunekit.app.export.export_run`).
Every writer goes through a temporary file, checks it, then renames it.
"""
from __future__ import annotations

import os
from typing import Optional

import mindspore as ms
import mindspore.nn as nn
import numpy as np

from prunekit.errors import PlanError
from prunekit.app.export import (DEFAULT_TOLERANCE, ModelStructure, export_graph, make_export,
                                 save_beside_structure, structure_path)

from .layers import MindSporeModelHandle, write_


def mindir_outputs(path: str, x: np.ndarray) -> np.ndarray:
    """Outputs of a MindIR file on a NumPy batch (``mindspore.load`` + ``nn.GraphCell``)."""
    cell = nn.GraphCell(ms.load(path))
    return cell(ms.Tensor(np.ascontiguousarray(x, dtype=np.float32))).asnumpy()


def export_mindir(handle: MindSporeModelHandle, path: str, check_input: Optional[np.ndarray] = None,
                  reference: Optional[np.ndarray] = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write ``handle``'s model (eval mode) as MindIR at ``path``; returns ``{"path", "max_abs_diff"}``.

    The reloaded file is run on ``check_input`` (default: 8 seeded normal images) and compared
    with ``reference`` (default: the Cell's own outputs on that batch).
    """
    spec = ms.Tensor(shape=[None] + [int(d) for d in handle.input_shape], dtype=ms.float32)
    # mindspore.export appends ".mindir" to file_name
    return export_graph(handle, path, ".mindir", "MindIR", "MindIR model (GraphCell)",
                        lambda tmp: ms.export(handle.model, spec, file_name=tmp[:-7], file_format="MINDIR"),
                        mindir_outputs, check_input, reference, tolerance)


def checkpoint_entries(model: nn.Cell) -> list:
    """``[{"name": path, "data": Parameter}]`` for every parameter of ``model`` (BN statistics
    included), named by its path in the Cell: the names ``mindspore.save_checkpoint`` writes."""
    return [{"name": path, "data": p} for path, p in model.parameters_and_names()]


def save_checkpoint(handle: MindSporeModelHandle, path: str, structure: ModelStructure) -> dict:
    """Write ``handle``'s parameters to the MindSpore checkpoint ``path`` and ``structure`` next to it."""
    return save_beside_structure(path, ".ckpt", "MindSpore",
                                 lambda tmp: ms.save_checkpoint(checkpoint_entries(handle.model), tmp), structure)


def load_checkpoint(path: str, structure: Optional[ModelStructure] = None) -> MindSporeModelHandle:
    """A new MindSpore model rebuilt from the structure description next to ``path`` (or
    ``structure``) holding the parameters of ``path``; every name and shape must match."""
    from prunekit.backends.mindspore import BACKEND as backend

    structure = structure or ModelStructure.load(structure_path(path))
    if not os.path.exists(path):
        raise PlanError(f"no MindSpore checkpoint at {path}")
    try:
        saved = ms.load_checkpoint(path)
    except Exception as e:  # protobuf/IO errors of many kinds
        raise PlanError(f"MindSpore checkpoint {path} is damaged: {type(e).__name__}: {e}") from None
    handle = structure.build(backend)
    own = dict(handle.model.parameters_and_names())
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        raise PlanError(f"{path} does not fit the {structure.model} model it describes: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    for name, p in own.items():
        if tuple(saved[name].shape) != tuple(p.shape):
            raise PlanError(f"{path}: {name!r} has shape {tuple(saved[name].shape)}, the model expects {tuple(p.shape)}")
    for name, p in own.items():
        write_(p, saved[name])
    return handle


#: the entry point of ``prunekit export`` (:func:`prunekit.app.export.export_run`)
export = make_export("mindspore", "mindir", export_mindir, "mindspore-ckpt", ".ckpt", "MindSpore", "checkpoint",
                     save_checkpoint, load_checkpoint)
