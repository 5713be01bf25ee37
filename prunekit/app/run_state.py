"""What a ``prunekit run`` has done so far, step by step: the global step, the measured
trajectory, the accuracies, and when to checkpoint.

:class:`RunProgress` is told about every training step by the job. It

* records the trajectory every ``record_every`` steps and at the phase ends: the step, the
  sparsity *measured from the algorithm's masks* (pruned entries over all prunable weights),
  the mean of the algorithm's ranks where it has ranks, the step's train loss and the running
  train accuracy of the epoch;
* writes a checkpoint (:mod:`prunekit.app.checkpoint`) every ``checkpoint_every`` steps and at the
  end of each phase, holding the model, the trainer's optimizer and random states (captured by
  the backend: ``Backend.capture_training_state``, ``rng_state``), the algorithm's ``state_dict`` and its own state, so a
  resumed run records the very same trajectory;
* feeds the progress bar's postfix (loss, running accuracy, measured sparsity).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

from prunekit.app import checkpoint as ckpt


def mask_sparsity(handle, algorithm) -> float:
    """Pruned mask entries over all prunable weights of the model (0 without masks)."""
    total = sum(l.numel for l in handle.layers)
    if algorithm is None or not algorithm.masks or total == 0:
        return 0.0
    ops = algorithm.ops
    pruned = sum(ops.size(m) - ops.item(ops.sum(m)) for m in algorithm.masks.values())
    return float(pruned) / float(total)


def mean_rank(algorithm) -> Optional[float]:
    ranks = getattr(algorithm, "ranks", None) if algorithm is not None else None
    if not ranks:
        return None
    return float(sum(ranks.values())) / len(ranks)


class RunProgress:
    def __init__(self, steps_per_epoch: int, dense_epochs: int, prune_epochs: int,
                 checkpoint_every: Optional[int], identity: dict, out: str, backend, handle,
                 record_every: Optional[int] = None):
        self.steps_per_epoch = int(steps_per_epoch)
        self.dense_steps = int(dense_epochs) * self.steps_per_epoch
        self.total_steps = self.dense_steps + int(prune_epochs) * self.steps_per_epoch
        every = self.steps_per_epoch if checkpoint_every is None else int(checkpoint_every)
        self.checkpoint_every = max(0, every)
        self.record_every = int(record_every or max(1, self.steps_per_epoch // 10))
        self.identity, self.out, self.backend, self.handle = identity, out, backend, handle
        self.step = 0                     # global optimizer steps done
        self.accuracy: Dict[str, float] = {}
        self.trajectory: List[dict] = []
        self.seconds = {"dense": 0.0, "prune": 0.0, "checkpoint": 0.0}
        self.checkpoints_written = 0
        self.resumed_at: List[int] = []
        self.epoch_correct = 0.0          # running train accuracy of the current epoch
        self.epoch_seen = 0
        self._pending_correct: list = []
        self.last_sparsity = 0.0
        #: a decision made before training (an at-initialization algorithm's), checkpointed as is
        self.decision = None

    # ------------------------------------------------------------------ position
    def phase_of(self, step: int) -> str:
        return "dense" if step < self.dense_steps else "prune"

    def dense_done(self) -> bool:
        return self.step >= self.dense_steps and (self.dense_steps == 0 or "before_pruning" in self.accuracy)

    def start_in_phase(self, phase: str) -> int:
        """Steps of ``phase`` already done."""
        if phase == "dense":
            return min(self.step, self.dense_steps)
        return max(0, self.step - self.dense_steps)

    # ------------------------------------------------------------------ per step
    def after_step(self, trainer, algorithm, loss, batch_size: int) -> None:
        self.step += 1
        if (self.step - 1) % self.steps_per_epoch == 0:  # first step of an epoch
            self.epoch_correct, self.epoch_seen, self._pending_correct = 0.0, 0, []
        correct = getattr(trainer, "last_correct", None)
        if correct is not None:
            self._pending_correct.append(correct)
        self.epoch_seen += int(batch_size)
        phase = self.phase_of(self.step - 1)
        end_of_phase = self.step in (self.dense_steps, self.total_steps)
        if self.step % self.record_every == 0 or end_of_phase:
            self.record(phase, algorithm, loss)
        periodic = self.checkpoint_every and self.step % self.checkpoint_every == 0
        # the dense phase's last checkpoint is written after its evaluation (save_phase_end)
        if self.checkpoint_every and (periodic or self.step == self.total_steps) and self.step != self.dense_steps:
            self.save(trainer, algorithm, phase)

    def train_accuracy(self) -> Optional[float]:
        if self._pending_correct:
            self.epoch_correct += sum(float(c) for c in self._pending_correct)
            self._pending_correct = []
        return self.epoch_correct / self.epoch_seen if self.epoch_seen else None

    def record(self, phase: str, algorithm, loss=None) -> dict:
        self.last_sparsity = mask_sparsity(self.handle, algorithm)
        point = {"step": self.step, "phase": phase, "epoch": (self.step - 1) // self.steps_per_epoch if self.step else 0,
                 "sparsity": self.last_sparsity}
        rank = mean_rank(algorithm)
        if rank is not None:
            point["mean_rank"] = rank
        if loss is not None:
            point["loss"] = float(loss)
            acc = self.train_accuracy()
            if acc is not None:
                point["train_accuracy"] = acc
        self.trajectory.append(point)
        return point

    def postfix(self, loss, algorithm) -> dict:
        post = {"loss": f"{float(loss):.3f}"}
        acc = self.train_accuracy()
        if acc is not None:
            post["acc"] = f"{acc:.1%}"
        if algorithm is not None:
            post["sparsity"] = f"{self.last_sparsity:.1%}"
        return post

    # ------------------------------------------------------------------ checkpoints
    def save(self, trainer, algorithm, phase: str) -> None:
        if not self.checkpoint_every:
            return
        t0 = time.perf_counter()
        self.train_accuracy()  # flush the pending counts into plain numbers
        _, in_phase, epoch, batch = ckpt.position_of(self.step, self.steps_per_epoch, self.dense_steps // max(1, self.steps_per_epoch))
        state = {
            "identity": self.identity,
            "position": {"step": self.step, "phase": phase, "step_in_phase": in_phase, "epoch": epoch, "batch": batch,
                         "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps},
            "model": self.handle.state_numpy(),
            "trainer_phase": phase,
            "optimizer": self.backend.capture_training_state(trainer) if trainer is not None else None,
            "algorithm": algorithm.state_dict() if algorithm is not None else None,
            "rng": {"framework": self.backend.rng_state(), "host": ckpt.host_rng_state()},
            "run": self.state_dict(),
            "decision": self.decision,
        }
        ckpt.save_checkpoint(self.out, state)
        self.checkpoints_written += 1
        self.seconds["checkpoint"] += time.perf_counter() - t0

    def state_dict(self) -> dict:
        return {"accuracy": dict(self.accuracy), "trajectory": list(self.trajectory), "seconds": dict(self.seconds),
                "resumed_at": list(self.resumed_at), "epoch_correct": self.epoch_correct,
                "epoch_seen": self.epoch_seen, "last_sparsity": self.last_sparsity}

    def load(self, state: dict) -> None:
        """Take the run's progress from a checkpoint (the model, trainer and algorithm are
        restored by the job, which knows when each exists)."""
        pos, run = state["position"], state.get("run", {})
        if pos.get("steps_per_epoch") != self.steps_per_epoch or pos.get("total_steps") != self.total_steps:
            raise ckpt.CheckpointError(
                f"checkpoint has {pos.get('steps_per_epoch')} steps per epoch and {pos.get('total_steps')} in all, "
                f"this run {self.steps_per_epoch} and {self.total_steps}; refusing to resume")
        self.step = int(pos["step"])
        self.accuracy = {k: float(v) for k, v in run.get("accuracy", {}).items()}
        self.trajectory = [dict(p) for p in run.get("trajectory", [])]
        self.seconds.update({k: float(v) for k, v in run.get("seconds", {}).items()})
        self.resumed_at = [int(s) for s in run.get("resumed_at", [])] + [self.step]
        self.epoch_correct = float(run.get("epoch_correct", 0.0))
        self.epoch_seen = int(run.get("epoch_seen", 0))
        self.last_sparsity = float(run.get("last_sparsity", 0.0))
