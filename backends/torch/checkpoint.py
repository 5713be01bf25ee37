"""PyTorch state for ``prunekit run`` checkpoints: optimizer state and random states as NumPy.

The neutral format and the checks live in :mod:`prunekit.app.checkpoint`; this module only turns
the framework's state into the plain trees it stores, and back:

* :func:`capture_training_state` / :func:`restore_training_state`: a :class:`~.driver.Trainer`'s
  optimizer state (``optimizer.state_dict()``, tensors as NumPy) and its session's step;
* :func:`rng_state` / :func:`set_rng_state`: PyTorch's CPU (and CUDA) generators (NumPy's and
  Python's are captured by the neutral core);
* :func:`make_deterministic`: deterministic kernels and one intra-op thread, for bitwise
  reproducible runs on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from prunekit.app.checkpoint import CheckpointError


def make_deterministic(threads: int = 1) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(threads))
    torch.backends.cudnn.benchmark = False


def _to_tree(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().numpy().copy(), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, dict):
        return {str(k): _to_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tree(v) for v in value]
    return value


def _from_tree(value, device):
    if isinstance(value, dict):
        if set(value) == {"tensor", "dtype"} and isinstance(value["tensor"], np.ndarray):
            return torch.as_tensor(value["tensor"], dtype=getattr(torch, value["dtype"]), device=device)
        return {k: _from_tree(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_tree(v, device) for v in value]
    return value


def capture_training_state(trainer) -> dict:
    """The trainer's optimizer state and step, as a tree of NumPy arrays and plain values."""
    sd = trainer.optimizer.state_dict()
    return {"framework": "torch", "step": int(trainer.session.step),
            "optimizer_class": type(trainer.optimizer).__name__,
            "state": {str(k): _to_tree(v) for k, v in sd["state"].items()},
            "param_groups": _to_tree(sd["param_groups"])}


def restore_training_state(trainer, state: dict) -> None:
    """Inverse of :func:`capture_training_state` on a trainer built with the same settings."""
    if state.get("framework") != "torch":
        raise CheckpointError(f"optimizer state was saved by the {state.get('framework')!r} backend, not torch")
    opt = trainer.optimizer
    if state.get("optimizer_class") != type(opt).__name__:
        raise CheckpointError(f"optimizer state is for {state.get('optimizer_class')}, this run uses "
                              f"{type(opt).__name__}")
    params = [p for g in opt.param_groups for p in g["params"]]
    device = params[0].device if params else None
    restored = {}
    for k, v in state["state"].items():
        i = int(k)
        if i >= len(params):
            raise CheckpointError(f"optimizer state has an entry for parameter {i}, the model has {len(params)}")
        entry = _from_tree(v, device)
        for name, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[i].shape):
                raise CheckpointError(f"optimizer state {name!r} of parameter {i} has shape {tuple(t.shape)}, "
                                      f"the parameter {tuple(params[i].shape)}")
        restored[i] = entry
    groups = _from_tree(state["param_groups"], device)
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        raise CheckpointError("optimizer state has other parameter groups than this run's optimizer")
    opt.load_state_dict({"state": restored, "param_groups": groups})
    trainer.session.step = int(state["step"])


def rng_state() -> dict:
    """PyTorch's generators (NumPy's and Python's: :func:`prunekit.app.checkpoint.host_rng_state`)."""
    state = {"framework": "torch", "torch": torch.get_rng_state().numpy().copy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().copy() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    if state.get("framework") != "torch":
        raise CheckpointError(f"random state was saved by the {state.get('framework')!r} backend, not torch")
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.asarray(s, dtype=np.uint8)) for s in state["cuda"]])

