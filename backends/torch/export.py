"""Exports of PyTorch models: ONNX, and PyTorch ``state_dict`` files that either backend reloads.

* :func:`export_onnx` writes an ONNX file with the legacy TorchScript exporter
  (``dynamo=False``: no ``onnxscript`` dependency; opset 17, batch axis dynamic), runs it with
  onnxruntime on a check batch and compares with the model's own outputs before the file is put
  in place.
* :func:`save_state_dict` writes ``model.state_dict()`` (``torch.save``) plus the structure
  description next to it (:class:`prunekit.app.export.ModelStructure`); :func:`load_state_dict`
  rebuilds the model, decomposed or compacted, from that description and loads the file
  strictly. A MindSpore model becomes a ``.pt`` through the same code: its shared-name state is
  loaded into the rebuilt PyTorch twin, whose ``state_dict`` is saved.

:func:`export` is the entry point of ``prunekit export`` (:func:`prunekit.app.export.export_run`).
Every writer goes through a temporary file, checks it, then renames it: a failed check leaves
no file behind.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch

from prunekit.errors import BackendUnavailable, PlanError
from prunekit.app.export import (DEFAULT_TOLERANCE, ModelStructure, export_graph, make_export,
                                 save_beside_structure, structure_path)

from .layers import TorchModelHandle

ONNX_OPSET = 17


def onnx_outputs(path: str, x: np.ndarray) -> np.ndarray:
    """Outputs of an ONNX file on a NumPy batch, with onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable(f"checking an ONNX file needs onnxruntime (pip install onnxruntime): {e}") from None

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(handle: TorchModelHandle, path: str, check_input: Optional[np.ndarray] = None,
                reference: Optional[np.ndarray] = None, tolerance: float = DEFAULT_TOLERANCE,
                opset: int = ONNX_OPSET) -> dict:
    """Write ``handle``'s model (eval mode) as ONNX at ``path``; returns ``{"path", "max_abs_diff"}``.

    The file is checked with onnxruntime on ``check_input`` (default: 8 seeded normal images)
    against ``reference`` (default: ``handle.predict`` of that batch).
    """
    model = handle.model

    def write(tmp):
        dummy = torch.zeros((1,) + tuple(handle.input_shape), device=next(model.parameters()).device)
        with warnings.catch_warnings():  # the TorchScript exporter warns about its own internals
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

    return export_graph(handle, path, ".onnx", "ONNX", "ONNX model (onnxruntime)", write, onnx_outputs, check_input,
                        reference, tolerance)


def save_state_dict(handle: TorchModelHandle, path: str, structure: ModelStructure) -> dict:
    """Write ``handle.model.state_dict()`` to ``path`` and ``structure`` next to it."""
    return save_beside_structure(
        path, ".pt", "PyTorch",
        lambda tmp: torch.save({k: v.detach().cpu() for k, v in handle.model.state_dict().items()}, tmp), structure)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise PlanError(f"no PyTorch weights at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of many kinds
        raise PlanError(f"PyTorch weights {path} are damaged: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise PlanError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def load_state_dict(path: str, structure: Optional[ModelStructure] = None) -> TorchModelHandle:
    """A new PyTorch model rebuilt from the structure description next to ``path`` (or
    ``structure``) holding the weights of ``path``; names and shapes must match exactly."""
    from prunekit.backends.torch import BACKEND as backend

    structure = structure or ModelStructure.load(structure_path(path))
    state = read_state_dict(path)
    handle = structure.build(backend)
    try:
        handle.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PlanError(f"{path} does not fit the {structure.model} model it describes: {e}") from None
    return handle


#: the entry point of ``prunekit export`` (:func:`prunekit.app.export.export_run`)
export = make_export("torch", "onnx", export_onnx, "torch", ".pt", "PyTorch", "state_dict", save_state_dict,
                     load_state_dict)
