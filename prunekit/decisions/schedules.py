"""Sparsity schedules for gradual pruning.

* ``cubic`` (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3 for
  t in [t0, t0 + nΔt], updated every Δt steps; before t0 it is s_i, after the end s_f.
* ``exponential`` (RPG's release): density at update u of U is D^(u / U), D = 1 - s_f; with
  ``lag`` = 1 it runs one update behind, D^((u - 1) / U) (the release's first update keeps
  density 1), reaching D at the end step all the same.
* ``oneshot``: s_f from step t0 on.

A schedule answers two questions: is ``step`` an update step, and what sparsity holds there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.decisions.selection import check_sparsity
from prunekit.errors import ConfigError

SCHEDULES = ("cubic", "exponential", "oneshot")


@dataclass
class SparsitySchedule:
    final_sparsity: float
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    kind: str = "cubic"
    initial_sparsity: float = 0.0
    lag: int = 0  # exponential: updates the density runs behind

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.kind!r}; expected one of {', '.join(SCHEDULES)}")
        self.final_sparsity = check_sparsity(self.final_sparsity, "final sparsity")
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial sparsity")
        if self.frequency < 1:
            raise ConfigError(f"schedule frequency must be >= 1, got {self.frequency}")
        if isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 0:
            raise ConfigError(f"schedule lag must be a non-negative integer, got {self.lag!r}")
        if self.begin_step < 0 or self.end_step < self.begin_step:
            raise ConfigError(f"schedule needs 0 <= begin_step <= end_step, got {self.begin_step}, {self.end_step}")

    def is_update_step(self, step: int) -> bool:
        if step < self.begin_step:
            return False
        if self.kind == "oneshot":
            return step == self.begin_step
        if step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return self.initial_sparsity if self.kind == "cubic" else 0.0
        if self.kind == "oneshot" or step >= self.end_step or self.end_step == self.begin_step:
            return self.final_sparsity
        frac = (step - self.begin_step) / float(self.end_step - self.begin_step)
        if self.kind == "cubic":
            s_i, s_f = self.initial_sparsity, self.final_sparsity
            return s_f + (s_i - s_f) * (1.0 - frac) ** 3
        # exponential in density, over update indices u = 0..U
        n_updates = max(1, math.ceil((self.end_step - self.begin_step) / self.frequency))
        u = max(0, (step - self.begin_step) // self.frequency - self.lag)
        density = (1.0 - self.final_sparsity) ** (min(u, n_updates) / n_updates)
        return 1.0 - density


LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass
class LearningRateSchedule:
    """Learning rate per step: constant, cosine to zero, or ×``gamma`` at step ``milestones``."""

    base_lr: float
    total_steps: int
    kind: str = "cosine"
    milestones: tuple = ()
    gamma: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.base_lr!r}")

    def lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "cosine":
            t = min(1.0, step / max(1, self.total_steps))
            return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * t))
        return self.base_lr * self.gamma ** sum(1 for m in self.milestones if step >= m)
