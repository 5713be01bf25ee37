"""MindSpore state for ``prunekit run`` checkpoints: optimizer state and random state as NumPy.

The neutral format and the checks live in :mod:`prunekit.app.checkpoint`; this module only turns
the framework's state into the plain trees it stores, and back:

* :func:`capture_training_state` / :func:`restore_training_state`: every Parameter a
  :class:`~.driver.Trainer`'s optimizer holds besides the model's own (``global_step``,
  ``learning_rate``, ``accum.*`` and the first-step flags ``stat.*`` of ``nn.SGD``,
  ``moment1.*``/``moment2.*`` and the beta powers of Adam), by name, and its session's step;
* :func:`rng_state` / :func:`set_rng_state`: MindSpore's default generator (NumPy's and
  Python's are captured by the neutral core);
* :func:`make_deterministic`: deterministic kernels and one CPU operator thread.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms

from prunekit.app.checkpoint import CheckpointError

from .layers import write_


def make_deterministic(threads: int = 1) -> None:
    # MindSpore refuses a second set_deterministic in a process (a second run in the same process)
    if ms.get_context("deterministic") != "ON":
        ms.set_deterministic(True)
    try:
        from mindspore.device_context.cpu.op_tuning import threads_num
        threads_num(int(threads))
    except (ImportError, RuntimeError, TypeError, ValueError):  # older releases, or set already
        pass


def _optimizer_state(optimizer):
    own = {id(p) for p in optimizer.parameters}
    return {name: p for name, p in optimizer.parameters_and_names() if id(p) not in own}


def capture_training_state(trainer) -> dict:
    """The trainer's optimizer state (every non-model Parameter, by name) and step."""
    return {"framework": "mindspore", "step": int(trainer.session.step),
            "optimizer_class": type(trainer.optimizer).__name__,
            "parameters": {n: p.asnumpy().copy() for n, p in _optimizer_state(trainer.optimizer).items()}}


def restore_training_state(trainer, state: dict) -> None:
    """Inverse of :func:`capture_training_state` on a trainer built with the same settings;
    every name and shape is checked before anything is written."""
    if state.get("framework") != "mindspore":
        raise CheckpointError(f"optimizer state was saved by the {state.get('framework')!r} backend, not mindspore")
    if state.get("optimizer_class") != type(trainer.optimizer).__name__:
        raise CheckpointError(f"optimizer state is for {state.get('optimizer_class')}, this run uses "
                              f"{type(trainer.optimizer).__name__}")
    own = _optimizer_state(trainer.optimizer)
    saved = state["parameters"]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        raise CheckpointError(f"optimizer state does not match this run's optimizer: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for n, p in own.items():
        if tuple(np.shape(saved[n])) != tuple(p.shape):
            raise CheckpointError(f"optimizer state {n!r} has shape {tuple(np.shape(saved[n]))}, this run's "
                                  f"{tuple(p.shape)}")
    for n, p in own.items():
        value = np.asarray(saved[n])
        # a 0-d NumPy array made into a Tensor and copied into a 0-d Parameter (learning_rate,
        # momentum) breaks the next compiled optimizer call (MindSpore 2.10); a Python scalar does not
        write_(p, ms.Tensor(value.item(), dtype=p.dtype) if value.ndim == 0 else
               ms.Tensor(np.ascontiguousarray(value), dtype=p.dtype))
    trainer.session.step = int(state["step"])
    trainer._lr_now = None  # the learning rate Parameter was just restored; set it again at the next step


def rng_state() -> dict:
    """MindSpore's default generator (NumPy's and Python's: :func:`prunekit.app.checkpoint.host_rng_state`)."""
    return {"framework": "mindspore", "mindspore": ms.get_rng_state().asnumpy().copy()}


def set_rng_state(state: dict) -> None:
    if state.get("framework") != "mindspore":
        raise CheckpointError(f"random state was saved by the {state.get('framework')!r} backend, not mindspore")
    ms.set_rng_state(ms.Tensor(np.asarray(state["mindspore"], dtype=np.uint8)))
