"""Divergence detection: a non-finite loss, gradient or weight stops training at the step it
appears, before any pruning decision can be made from it.

:class:`FiniteGuard` is owned by every training session (:class:`prunekit.app.session.SessionBase`,
so plain dense training, every algorithm and both backends). Within a step it only *notes*
device-side sums, with no host synchronisation: the loss (``note_loss``, from the trainer) and
the dense gradients an algorithm observes (``note_gradients``). At the end of the step, after
the optimizer update and the re-masking and before the algorithm's ``after_step`` (where mask
updates and rank decisions happen), :meth:`FiniteGuard.check` adds the sums of every prunable
weight to them and reads that one scalar: NaN and Inf propagate through a sum, so one host read
per step tells whether anything noted is non-finite. Only then, on the failure path, is each
tensor looked at to name the first layer affected. The check raises :class:`DivergenceError`,
which names the step, what went non-finite (loss, gradient or weight) and the first layer.

Since the next step's ``before_step`` decisions read the weights checked here, and the
algorithm's gradient statistics are checked before the ``after_step`` that could use them, no
decision ever sees a non-finite value. ``prunekit run`` writes no checkpoint of the step (the
last good checkpoint stays as it was) and writes a report whose ``status`` is ``"failed"``
(:func:`write_failure_report`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from prunekit.errors import PrunekitError


class DivergenceError(PrunekitError, FloatingPointError):
    """Training produced a NaN or Inf (loss, gradient or weight); the run stops at that step."""

    def __init__(self, step: int, what: str, layer: Optional[str], detail: str = "", where: str = ""):
        self.step, self.what, self.layer, self.detail = int(step), what, layer, detail
        affected = f" (first layer affected: {layer!r})" if layer else ""
        where = where or f"at step {self.step} of the session (counted from 0)"
        super().__init__(f"training diverged {where}: non-finite {what}{affected}{detail}; stopped before "
                         "any pruning decision used it (lower the learning rate, or check the data)")

    def in_run(self, step: int, phase: str) -> "DivergenceError":
        """The same error, its step given as the run's 1-based global step (``prunekit run``)."""
        return DivergenceError(step, self.what, self.layer, self.detail,
                               where=f"at step {step} of the run ({phase} phase)")


class FiniteGuard:
    """The end-of-step finite check of one session (see the module docstring)."""

    def __init__(self, handle, weights: Dict[str, object]):
        self.ops = handle.ops
        self.weights = weights  # layer name -> weight tensor, in the model's layer order
        self._loss = None
        self._grad_sums: List[object] = []
        self._grads: Optional[Dict[str, object]] = None
        self.enabled = True
        #: the error once raised: the session refuses every later step (the weights hold NaN/Inf)
        self.failed: Optional[DivergenceError] = None

    def note_loss(self, loss) -> None:
        """The step's loss (a 0-d tensor or a number): checked at :meth:`check`."""
        self._loss = loss

    def note_gradients(self, grads: Dict[str, object]) -> None:
        """Gradients an algorithm is shown this step (summed on the device, read at :meth:`check`)."""
        if grads:
            ops = self.ops
            self._grads = grads
            self._grad_sums.append(ops.sum(ops.stack([ops.cast(ops.sum(g), "float32") for g in grads.values()])))

    def check(self, step: int) -> None:
        """Raise :class:`DivergenceError` if the step's loss, noted gradients or any prunable
        weight is NaN or Inf (one host read of one scalar when all is well)."""
        loss, grads, grad_sums = self._loss, self._grads, self._grad_sums
        self._loss, self._grads, self._grad_sums = None, None, []
        if not self.enabled:
            return
        ops = self.ops
        parts = [ops.cast(ops.sum(w), "float32") for w in self.weights.values()] + grad_sums
        if loss is not None and not isinstance(loss, (int, float)):
            parts.append(ops.cast(ops.reshape(loss, ()), "float32"))
        if not parts:
            return
        total = ops.item(ops.sum(ops.stack(parts)))
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            total = float("nan")
        if math.isfinite(total):
            return
        try:
            self._explain(step, loss, grads)
        except DivergenceError as e:
            self.failed = e
            raise

    def refuse_if_failed(self) -> None:
        """Raise the divergence already found again (a caller that went on after it)."""
        if self.failed is not None:
            raise self.failed

    def _explain(self, step: int, loss, grads) -> None:
        """The failure path: find what is non-finite, first layer first, and raise."""
        ops = self.ops
        loss_value = None if loss is None else (float(loss) if isinstance(loss, (int, float))
                                                else ops.item(ops.reshape(loss, ())))
        bad_weight = _first_bad(ops, self.weights)
        bad_grad = _first_bad(ops, grads or {})
        if loss_value is not None and not math.isfinite(loss_value):
            layer = bad_grad or bad_weight
            raise DivergenceError(step, f"loss ({loss_value})", layer)
        if bad_grad is not None:
            raise DivergenceError(step, "gradient", bad_grad)
        if bad_weight is not None:
            count = _count_bad(ops, self.weights[bad_weight])
            raise DivergenceError(step, "weight", bad_weight, f", {count} value(s)")
        # every entry finite but their sum overflowed: weights beyond float32's range in sum
        raise DivergenceError(step, "weight sum (overflow: weights of order 1e38)", None)


def _count_bad(ops, tensor) -> int:
    return ops.size(tensor) - int(round(ops.item(ops.sum(ops.cast(ops.isfinite(tensor), "float32")))))


def _first_bad(ops, tensors: Dict[str, object]) -> Optional[str]:
    for name, t in tensors.items():
        if _count_bad(ops, t):
            return name
    return None


def write_failure_report(out: str, error: DivergenceError, progress, run_info: dict) -> str:
    """``<out>/report.json`` and ``report.md`` of a run stopped by ``error``: ``status`` "failed",
    the error, the step and layer, the last good checkpoint's step and the trajectory so far.
    Returns the JSON path."""
    from prunekit.app import checkpoint as ckpt

    last = None
    try:
        last = ckpt.read_checkpoint(ckpt.checkpoint_path(out))["position"]["step"]
    except PrunekitError:
        pass
    report = {"status": "failed", "error": str(error), "failed_at_step": error.step, "non_finite": error.what,
              "first_layer": error.layer, "last_checkpoint_step": last, "run": run_info,
              "trajectory": list(getattr(progress, "trajectory", []))}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=repr)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# prunekit run: FAILED\n\n" + str(error) + "\n\n"
                + (f"The last good checkpoint (step {last}) is in {ckpt.checkpoint_dir(out)}.\n" if last is not None
                   else "No checkpoint was written before the failure.\n"))
    return path


def failed_run(error: DivergenceError, cfg, progress) -> DivergenceError:
    """The job's handling of a divergence: the failure report in ``cfg.out`` (rank 0 only, where
    files are written), then ``error`` to raise."""
    from prunekit.app.distributed import world

    phase = progress.phase_of(progress.step) if progress is not None else "training"
    error = error.in_run((progress.step if progress is not None else error.step) + 1, phase)
    if world().is_main:
        info = {"backend": cfg.backend, "model": cfg.model, "algorithm": cfg.algorithm, "dataset": cfg.dataset,
                "lr": cfg.lr, "seed": cfg.seed}
        write_failure_report(cfg.out, error, progress, info)
    return error
