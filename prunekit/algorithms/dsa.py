"""DSA — differentiable sparsity allocation (Ning et al., ECCV 2020; ALGORITHMS.md §3).

Budgeted channel pruning: every prunable channel group ``g`` (``prunekit.decisions.channel_groups``) gets a keep
ratio ``α_g = sigmoid(θ_g)``, learned by gradient descent on held-out data under the FLOPs
budget ``F(α) ≤ B`` (:mod:`prunekit.decisions.channel_flops`), while the weights train on the rest.

The differentiable pruning op of one group (C channels), per forward pass:

* importance ``b_i = |γ_i|`` of the group's BatchNorm scales (detached). A group normalised by
  several BNs (a residual stream) uses the mean of ``|γ_i|`` over them (``importance="mean"``;
  the sum gives the same probabilities: scaling every ``b`` by a constant only shifts ``log β₁``),
  or, as the release, one "primal" BN's: the group's first BN in the model's order
  (``importance="primal"``).
* keep probability ``p_i = min(sigmoid(β₂(log b_i − log β₁)) + 0.01, 1)``, ``β₂ = 1``, with
  ``β₁`` solved by bisection in log space so that ``mean(p) = α`` (:func:`solve_log_beta1`).
* mask ``m_i ~ Bernoulli(p_i)``, multiplied onto every BN output of the group (after BN, before
  ReLU) by the backend's gates (``backends/<fw>/gates.py``); straight-through: ``∂L/∂p_i`` is the
  gradient the framework computes for the gate ``m_i``.
* implicit differentiation through the root: ``∂L/∂α = C·Σ_i ∂L/∂p_i·s′_i / Σ_j s′_j`` with
  ``s′`` the sigmoid's derivative at ``p``'s argument, taken as 0 where ``p`` is capped at 1
  (there ``p`` does not move with ``β₁``) (:func:`alpha_gradient`); ``capped_gradient=True`` keeps
  the capped channels' ``s′`` as the release does.

All of this is done on the host in float64 NumPy: the vectors are one entry per channel, and
identical inputs give bit-identical decisions on every backend. Random masks are drawn from
``numpy.random.default_rng((seed, step, purpose))``.

Budget: after each α step the ratios are projected onto ``{F(α) ≤ B}`` (ALGORITHMS.md leaves
the update open; decision in docs/DECISIONS.md): ``α(λ) = clip(α̃ − λ∇F(α̃), lo, hi)`` with the
multiplier ``λ ≥ 0`` found by bisection (:func:`project_to_budget`). ``∇F ≥ 0``, so ``F(α(λ))``
falls monotonically in ``λ`` and the result always meets the budget; it is the Euclidean
projection's KKT point with ``∇F`` taken at ``α̃`` (exact where F is linear).

Final channels: the top ``⌈α_g·C_g⌉`` channels by ``b`` (ties: lower index) per group, with the
counts then adjusted one channel at a time so that the compacted model's FLOPs lie within
``budget_tolerance`` (2 %) below the budget (:func:`final_counts`). ``channel_keep`` holds the
kept indices per group; the pruned channels' BN scale and shift are set to zero so the
uncompacted model computes what the compacted one does.

Training schedule: the search runs over the first ``end_fraction`` of the steps, one α step on
a validation batch every ``arch_every`` steps (before the weight step); then the channels are
fixed and the remaining steps fine-tune at the final structure. The caller provides the held-out
batches as ``algorithm.validation`` (an iterator of ``(x, y)`` NumPy batches); ``prunekit.app.job``
splits ``val_fraction`` (10 %) of the training set off for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.contract.layers import signature
from prunekit.decisions.channel_flops import ChannelFlops
from prunekit.decisions.plan import PruningPlan
from prunekit.decisions.selection import top_channels
from prunekit.errors import ConfigError, ModelError, PlanError

#: the keep-probability floor of the release (p = sigmoid(...) + 0.01)
P_FLOOR = 0.01
#: bisection steps for log β₁ (the bracket is a few dozen wide: 200 halvings reach float64 resolution)
ROOT_STEPS = 200
#: bisection steps for the budget multiplier
BUDGET_STEPS = 200
#: channel importance of a group normalised by several BNs (:func:`group_importance`)
IMPORTANCE_RULES = ("mean", "primal")
#: smallest importance (|γ| = 0 would give log b = -inf)
MIN_IMPORTANCE = 1e-12


# ------------------------------------------------------------------------------ the pruning op
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def keep_probabilities(log_b: np.ndarray, log_beta1: float, beta2: float = 1.0,
                       floor: float = P_FLOOR, capped_gradient: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``(p, s′)``: the keep probabilities and the sigmoid's derivative at their argument
    (0 where ``p`` is capped at 1, unless ``capped_gradient``: the release's weights)."""
    s = _sigmoid(beta2 * (np.asarray(log_b, dtype=np.float64) - log_beta1))
    raw = s + floor
    p = np.minimum(raw, 1.0)
    ds = s * (1.0 - s) if capped_gradient else np.where(raw < 1.0, s * (1.0 - s), 0.0)
    return p, ds


def solve_log_beta1(log_b: np.ndarray, alpha: float, beta2: float = 1.0, floor: float = P_FLOOR) -> float:
    """``log β₁`` with ``mean(p) = α`` by bisection (``mean(p)`` falls as ``log β₁`` grows).

    ``α`` must lie in ``(floor, 1]``; at 1 the result is a ``log β₁`` where every ``p`` is 1.
    """
    log_b = np.asarray(log_b, dtype=np.float64)
    if not floor < alpha <= 1.0:
        raise ConfigError(f"keep ratio {alpha!r} outside ({floor}, 1]: no β₁ gives mean(p) = α")
    if beta2 <= 0:
        raise ConfigError(f"beta2 must be > 0, got {beta2!r}")
    lo = float(log_b.min()) - math.log((1.0 - floor) / floor) / beta2 - 1.0  # every p = 1 here
    hi = float(log_b.max()) + 50.0 / beta2                                    # every p ≈ floor here
    for _ in range(ROOT_STEPS):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            break
        p, _ = keep_probabilities(log_b, mid, beta2, floor)
        if p.mean() > alpha:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def alpha_gradient(grad_p: np.ndarray, ds: np.ndarray) -> float:
    """``∂L/∂α = C·Σ_i ∂L/∂p_i·s′_i / Σ_j s′_j`` (implicit differentiation of ``mean(p) = α``).
    Where every ``p`` is capped (``Σ s′ = 0``) the ratio is shared equally: ``Σ_i ∂L/∂p_i``."""
    grad_p = np.asarray(grad_p, dtype=np.float64)
    total = float(np.sum(ds))
    if total <= 0.0:
        return float(np.sum(grad_p))
    return float(grad_p.size * np.sum(grad_p * ds) / total)


def sample_mask(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``m_i ~ Bernoulli(p_i)`` as float32 0/1."""
    return (rng.random(p.shape) < p).astype(np.float32)


# ------------------------------------------------------------------------------ the budget
def project_to_budget(model: ChannelFlops, alpha: np.ndarray, budget: float, lo: np.ndarray,
                      hi: np.ndarray) -> Tuple[np.ndarray, float]:
    """``(α, λ)``: ``clip(α̃ − λ∇F(α̃), lo, hi)`` with the smallest ``λ ≥ 0`` (by bisection) for which
    ``F(α) ≤ budget``. Raises :class:`ConfigError` when even ``α = lo`` exceeds the budget."""
    a = np.clip(np.asarray(alpha, dtype=np.float64), lo, hi)
    if model.flops(a) <= budget:
        return a, 0.0
    if model.flops(lo) > budget:
        raise ConfigError(f"FLOPs budget {budget:.0f} MACs is below what the smallest allowed keep ratios cost "
                          f"({model.flops(lo):.0f} MACs); raise the budget or lower min_ratio")
    d = model.gradient(a)
    movable = (d > 0) & (a > lo)
    lam_hi = float(np.max((a[movable] - lo[movable]) / d[movable])) if movable.any() else 0.0
    lam_lo = 0.0
    for _ in range(BUDGET_STEPS):
        mid = 0.5 * (lam_lo + lam_hi)
        if mid == lam_lo or mid == lam_hi:
            break
        if model.flops(np.clip(a - mid * d, lo, hi)) <= budget:
            lam_hi = mid
        else:
            lam_lo = mid
    out = np.clip(a - lam_hi * d, lo, hi)
    return out, lam_hi


def final_counts(model: ChannelFlops, alpha: np.ndarray, budget: float, searchable: np.ndarray,
                 tolerance: float = 0.02, min_counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Channel counts per group: ``⌈α·C⌉``, then adjusted so that ``(1 − tolerance)·budget ≤ F ≤ budget``.

    Over budget: one channel at a time off the searchable group rounded up the most
    (``k − α·C`` largest; ties: first group). Under the window: one channel at a time onto the
    searchable group short the most (``k − α·C`` smallest) among those whose extra channel still
    fits the budget, until the window is reached or no channel fits.
    """
    sizes = model.sizes.astype(np.int64)
    searchable = np.asarray(searchable, dtype=bool)
    target = np.asarray(alpha, dtype=np.float64) * sizes
    counts = np.clip(np.ceil(target - 1e-9).astype(np.int64), 1, sizes)
    counts[~searchable] = sizes[~searchable]
    floor_counts = np.ones_like(sizes) if min_counts is None else np.asarray(min_counts, dtype=np.int64)
    flops = model.flops_of_counts(counts)
    while flops > budget:
        excess = np.where(searchable & (counts > floor_counts), counts - target, -np.inf)
        g = int(np.argmax(excess))
        if not np.isfinite(excess[g]):
            raise ConfigError(f"FLOPs budget {budget:.0f} MACs cannot be met with at least "
                              f"{floor_counts.tolist()} channels per group")
        counts[g] -= 1
        flops = model.flops_of_counts(counts)
    while flops < (1.0 - tolerance) * budget:
        best, best_key = -1, np.inf
        for g in np.flatnonzero(searchable & (counts < sizes)):
            trial = counts.copy()
            trial[g] += 1
            if model.flops_of_counts(trial) <= budget and counts[g] - target[g] < best_key:
                best, best_key = int(g), counts[g] - target[g]
        if best < 0:
            break
        counts[best] += 1
        flops = model.flops_of_counts(counts)
    return counts


def group_importance(state: Dict[str, np.ndarray], norms: Sequence[str], rule: str = "mean",
                     group=None) -> np.ndarray:
    """``mean over the group's BNs of |γ|`` (float64), or ``rule="primal"``: the first BN's. With
    ``group`` (a ``ChannelGroup``), each BN's scales are read at the group's channels (a BN over a
    concatenation holds the group's channels at an offset)."""
    gammas = []
    for bn in (norms[:1] if rule == "primal" else norms):
        key = f"{bn}.weight"
        if key not in state:
            raise ModelError(f"BatchNorm {bn!r} has no scale {key!r} in the model state")
        gamma = np.abs(np.asarray(state[key], dtype=np.float64)).ravel()
        if group is not None:
            gamma = gamma[group.in_index(bn, np.arange(group.size))]
        gammas.append(gamma)
    return np.mean(gammas, axis=0)


# ------------------------------------------------------------------------------ config
@dataclass
class DSAConfig:
    budget: float = 0.5            # fraction of the dense model's FLOPs (MACs) kept
    theta_init: float = 5.0        # α = sigmoid(θ), θ starts here (α ≈ 0.993)
    beta2: float = 1.0
    arch_lr: float = 0.05          # step size of the θ optimizer
    arch_optimizer: str = "adam"   # "adam" or "sgd"
    arch_every: int = 1            # one α step every this many weight steps
    end_fraction: float = 0.6      # search over this fraction of the steps, then fine-tune
    min_ratio: float = 0.05        # smallest keep ratio of a group (and at least one channel)
    val_fraction: float = 0.1      # held-out share of the training set for the α steps
    budget_tolerance: float = 0.02  # final FLOPs within this fraction below the budget
    seed: int = 0
    # departures from the released code (docs/DECISIONS.md): the release's behaviour on request
    capped_gradient: bool = False  # True: channels with p capped at 1 keep their weight s′ in ∂L/∂α
    importance: str = "mean"       # "mean" |γ| over the group's BNs, or "primal": its first BN's

    def __post_init__(self):
        def number(key, lo, hi, lo_open=True, hi_open=False):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"dsa {key} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                raise ConfigError(f"dsa {key} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
            setattr(self, key, float(v))

        number("budget", 0.0, 1.0)
        number("end_fraction", 0.0, 1.0)
        number("min_ratio", P_FLOOR, 1.0)
        number("val_fraction", 0.0, 1.0, hi_open=True)
        number("budget_tolerance", 0.0, 1.0, hi_open=True)
        number("arch_lr", 0.0, math.inf, lo_open=False)
        number("beta2", 0.0, math.inf)
        number("theta_init", -math.inf, math.inf)
        if str(self.arch_optimizer).lower() not in ("adam", "sgd"):
            raise ConfigError(f"dsa arch_optimizer must be 'adam' or 'sgd', got {self.arch_optimizer!r}")
        self.arch_optimizer = str(self.arch_optimizer).lower()
        if not isinstance(self.capped_gradient, bool):
            raise ConfigError(f"dsa capped_gradient must be true or false, got {self.capped_gradient!r}")
        if self.importance not in IMPORTANCE_RULES:
            raise ConfigError(f"dsa importance must be one of {', '.join(IMPORTANCE_RULES)}, got {self.importance!r}")
        for key in ("arch_every", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "arch_every" else 0):
                raise ConfigError(f"dsa {key} must be an integer >= {1 if key == 'arch_every' else 0}, got {v!r}")


def backend_gates(handle) -> Callable:
    """The channel-gate factory of the handle's backend (:meth:`Backend.channel_gates`)."""
    from prunekit.contract.backend import backend_of

    return backend_of(handle).channel_gates


# ------------------------------------------------------------------------------ the algorithm
@register_algorithm
class DSAPruner(Algorithm):
    """DSA on a model's channel groups; after :meth:`finish`, ``channel_keep`` and ``keep_ratios``."""

    name = "dsa"
    config_class = DSAConfig

    def __init__(self, config: Optional[DSAConfig] = None, groups: Optional[Sequence] = None,
                 gates_factory: Optional[Callable] = None, **kwargs):
        super().__init__()
        self.config = config or DSAConfig(**kwargs)
        self._given_groups = list(groups) if groups is not None else None
        self._gates_factory = gates_factory
        #: iterator of held-out ``(x, y)`` NumPy batches for the α steps
        self.validation: Optional[Iterator] = None
        self.channel_keep: Dict[str, np.ndarray] = {}
        self.keep_ratios: Dict[str, float] = {}
        self.history: List[dict] = []
        self.gates = None
        self.final_counts: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ setup
    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        cfg = self.config
        if self._given_groups is not None:
            groups = self._given_groups
        else:
            from prunekit.decisions.channel_groups import find_channel_groups
            groups = find_channel_groups(handle)
        self.groups = list(groups)
        self.flops_model = ChannelFlops(self.groups, handle.layers)
        self.searchable = np.array([bool(g.prunable) and len(g.norms) > 0 for g in self.groups])
        if not self.searchable.any():
            raise ModelError(f"{handle.model_name} has no prunable channel group with a BatchNorm; DSA needs BN scales")
        sizes = self.flops_model.sizes.astype(np.float64)
        self.lo = np.where(self.searchable, np.maximum(cfg.min_ratio, 1.0 / sizes), 1.0)
        self.hi = np.where(self.searchable, 1.0 - 1e-4, 1.0)
        self.dense_flops = self.flops_model.dense_flops()
        self.budget_flops = cfg.budget * self.dense_flops
        alpha = np.where(self.searchable, _sigmoid(cfg.theta_init), 1.0)
        self.alpha, self.multiplier = project_to_budget(self.flops_model, alpha, self.budget_flops, self.lo, self.hi)
        self.theta = self._logit(self.alpha)
        self._m = np.zeros_like(self.theta)
        self._v = np.zeros_like(self.theta)
        self._arch_steps = 0
        self._val_used = 0   # held-out batches drawn so far
        self._val_skip = 0   # batches to skip on the next draw (a resumed run)
        self.search_steps = int(round(cfg.end_fraction * self.total_steps))
        self.final_counts = None
        factory = self._gates_factory or backend_gates(handle)
        self.gates = factory(handle, {g.name: (tuple(g.norms), int(g.size), self._norm_offsets(g))
                                      for g, s in zip(self.groups, self.searchable) if s})
        return self

    @staticmethod
    def _norm_offsets(group) -> Dict[str, int]:
        """Where the group's channels start in each of its norms (0 unless the norm reads a concatenation)."""
        offsets = getattr(group, "in_offsets", {}) or {}
        return {bn: int(offsets[bn]) for bn in group.norms if bn in offsets}

    def _logit(self, alpha: np.ndarray) -> np.ndarray:
        a = np.clip(alpha, 1e-12, 1 - 1e-12)
        return np.where(self.searchable, np.log(a) - np.log1p(-a), np.inf)

    def _group_indices(self) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.searchable)]

    def importance(self) -> Dict[str, np.ndarray]:
        """``b`` per searchable group, from the model's current BN scales."""
        # only the BN scales, read each step: not the whole model state
        params, ops = self.handle.parameters_by_name(), self.ops
        idx = self._group_indices()
        scales = {key: ops.to_numpy(params[key]) for i in idx for key in (f"{bn}.weight" for bn in self.groups[i].norms)
                  if key in params}
        return {self.groups[i].name: group_importance(scales, self.groups[i].norms, self.config.importance, self.groups[i])
                for i in idx}

    def probabilities(self, b: Dict[str, np.ndarray]) -> Dict[str, Tuple[np.ndarray, np.ndarray, float]]:
        """Per group ``(p, s′, log β₁)`` at the current ratios."""
        out = {}
        for i in self._group_indices():
            g = self.groups[i]
            log_b = np.log(np.maximum(b[g.name], MIN_IMPORTANCE))
            t = solve_log_beta1(log_b, float(self.alpha[i]), self.config.beta2)
            p, ds = keep_probabilities(log_b, t, self.config.beta2, capped_gradient=self.config.capped_gradient)
            out[g.name] = (p, ds, t)
        return out

    def _sample(self, probs, step: int, purpose: int) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng((self.config.seed, step, purpose))
        return {name: sample_mask(p, rng) for name, (p, _, _) in probs.items()}

    # ------------------------------------------------------------------ the driver's calls
    def before_step(self, step: int) -> None:
        if self.final_counts is not None:
            return
        if step >= self.search_steps:
            self._finalize()
            return
        b = self.importance()
        if step % self.config.arch_every == 0:
            self.arch_step(step, b)
        self.gates.set(self._sample(self.probabilities(b), step, 0))

    def arch_step(self, step: int, b: Optional[Dict[str, np.ndarray]] = None) -> dict:
        """One α step on a held-out batch: gates at sampled masks, gate gradients, implicit
        gradient to α, θ update, budget projection. Returns what it computed."""
        if self.validation is None:
            raise ConfigError("DSA needs held-out batches for its α steps: set algorithm.validation to an "
                              "iterator of (x, y) batches (prunekit.app.job splits off val_fraction of the training set)")
        try:
            while self._val_skip > 0:  # a resumed run continues where the held-out batches were
                next(self.validation)
                self._val_skip -= 1
            x, y = next(self.validation)
            self._val_used += 1
        except StopIteration:
            raise ConfigError("DSA's validation batches ran out; give an endless iterator") from None
        b = self.importance() if b is None else b
        probs = self.probabilities(b)
        masks = self._sample(probs, step, 1)
        self.gates.set(masks)
        loss, grad_m = self.gates.gradients(x, y)
        return self.apply_gate_gradients(probs, grad_m, loss=loss, step=step)

    def apply_gate_gradients(self, probs, grad_m: Dict[str, np.ndarray], loss: float = float("nan"),
                             step: int = -1) -> dict:
        """The α update from gate gradients (straight-through ``∂L/∂p = ∂L/∂m``)."""
        cfg = self.config
        grad_alpha = np.zeros_like(self.alpha)
        for i in self._group_indices():
            name = self.groups[i].name
            grad_alpha[i] = alpha_gradient(grad_m[name], probs[name][1])
        idx = self.searchable
        grad_theta = np.where(idx, grad_alpha * self.alpha * (1.0 - self.alpha), 0.0)
        theta = self.theta.copy()
        if cfg.arch_optimizer == "adam":
            self._arch_steps += 1
            b1, b2, eps = 0.9, 0.999, 1e-8
            self._m = np.where(idx, b1 * self._m + (1 - b1) * grad_theta, 0.0)
            self._v = np.where(idx, b2 * self._v + (1 - b2) * grad_theta ** 2, 0.0)
            m_hat = self._m / (1 - b1 ** self._arch_steps)
            v_hat = self._v / (1 - b2 ** self._arch_steps)
            theta[idx] = theta[idx] - cfg.arch_lr * m_hat[idx] / (np.sqrt(v_hat[idx]) + eps)
        else:
            theta[idx] = theta[idx] - cfg.arch_lr * grad_theta[idx]
        unconstrained = np.where(idx, _sigmoid(np.where(idx, theta, 0.0)), 1.0)
        self.alpha, self.multiplier = project_to_budget(self.flops_model, unconstrained, self.budget_flops,
                                                        self.lo, self.hi)
        self.theta = self._logit(self.alpha)
        record = {"step": int(step), "loss": float(loss), "grad_alpha": grad_alpha, "alpha": self.alpha.copy(),
                  "unconstrained": unconstrained, "multiplier": float(self.multiplier),
                  "flops": self.flops_model.flops(self.alpha),
                  "log_beta1": {k: v[2] for k, v in probs.items()}}
        self.history.append({"step": record["step"], "loss": record["loss"], "flops": record["flops"]})
        return record

    def _finalize(self) -> None:
        """Fix the channels: top ⌈α·C⌉ by b per group, counts adjusted into the budget window."""
        b = self.importance()
        min_counts = np.where(self.searchable, np.ceil(self.lo * self.flops_model.sizes - 1e-9), 1).astype(np.int64)
        counts = final_counts(self.flops_model, self.alpha, self.budget_flops, self.searchable,
                              self.config.budget_tolerance, np.maximum(min_counts, 1))
        self.final_counts = counts
        keep, masks = {}, {}
        for i in self._group_indices():
            g = self.groups[i]
            kept = self._keep(g, b[g.name], int(counts[i]))
            counts[i] = len(kept)
            keep[g.name] = kept
            m = np.zeros(g.size, dtype=np.float32)
            m[kept] = 1.0
            masks[g.name] = m
        self.channel_keep = keep
        self.keep_ratios = {self.groups[i].name: float(counts[i]) / float(self.groups[i].size)
                            for i in self._group_indices()}
        self.gates.set(masks)

    @staticmethod
    def _keep(group, b: np.ndarray, count: int) -> np.ndarray:
        """The top ``count`` channels by ``b``; a group feeding grouped convs keeps as many in each
        conv group (the count rounded down), a GroupNorm's keeps whole norm groups (``fit_keep``)."""
        if getattr(group, "balanced", 1) > 1 or getattr(group, "whole", 1) > 1:
            from prunekit.decisions.channel_groups import fit_keep
            return np.asarray(fit_keep(group, b, count), np.int64)
        return top_channels(b, count)

    def _restore_decision(self, counts: np.ndarray, keep: dict) -> None:
        """Set the channel decision of a checkpoint (counts and kept indices), as :meth:`_finalize` made it."""
        masks, channel_keep = {}, {}
        for i in self._group_indices():
            g = self.groups[i]
            if g.name not in keep:
                raise PlanError(f"dsa state has no kept channels for group {g.name!r}")
            kept = np.asarray(keep[g.name], np.int64)
            if len(kept) != int(counts[i]) or (len(kept) and (kept.min() < 0 or kept.max() >= g.size)):
                raise PlanError(f"dsa state's kept channels of group {g.name!r} do not fit its count or size")
            channel_keep[g.name] = kept
            m = np.zeros(g.size, dtype=np.float32)
            m[kept] = 1.0
            masks[g.name] = m
        self.final_counts = counts
        self.channel_keep = channel_keep
        self.keep_ratios = {self.groups[i].name: float(counts[i]) / float(self.groups[i].size)
                            for i in self._group_indices()}
        self.gates.set(masks)

    def finish(self) -> None:
        if self.final_counts is None:
            self._finalize()
        # fold the final gates into the BNs (scale and shift 0 on pruned channels), then drop the gates
        state = self.handle.state_numpy()
        update = {}
        for i in self._group_indices():
            g = self.groups[i]
            drop = np.setdiff1d(np.arange(g.size), self.channel_keep[g.name])
            for bn in g.norms:
                for leaf in ("weight", "bias"):
                    key = f"{bn}.{leaf}"
                    if key in state:
                        v = update.get(key, state[key]).copy()  # a norm over a concatenation: several groups
                        v[g.in_index(bn, drop)] = 0
                        update[key] = v
        self.handle.load_state_numpy(update, strict=False)
        self.gates.remove()

    # ------------------------------------------------------------------ output
    @property
    def final_flops(self) -> Optional[float]:
        return None if self.final_counts is None else self.flops_model.flops_of_counts(self.final_counts)

    @property
    def held_out_fraction(self) -> float:
        return self.config.val_fraction

    def describe(self) -> dict:
        out = {"budget": self.config.budget, "budget_macs": self.budget_flops, "dense_macs": self.dense_flops,
               "alpha": {self.groups[i].name: float(self.alpha[i]) for i in self._group_indices()},
               "alpha_macs": self.flops_model.flops(self.alpha)}
        if self.final_counts is not None:
            out["final_macs"] = self.final_flops
            out["final_fraction"] = self.final_flops / self.dense_flops
        return out

    def plan(self) -> PruningPlan:
        return PruningPlan(model=self.handle.model_name, algorithm=self.name, backend=self.ops.name,
                           layer_signature=signature(self.handle.layers), masks={},
                           keep_ratios=dict(self.keep_ratios),
                           kept_channels={k: [int(i) for i in v] for k, v in self.channel_keep.items()},
                           meta=self.describe())

    def state_dict(self) -> dict:
        """Everything carried between steps: ratios, θ and its Adam moments, held-out batches used,
        the final counts once fixed (masks are drawn from (seed, step), so no generator state)."""
        state = super().state_dict()
        state["dsa"] = {"alpha": self.alpha.copy(), "theta": self.theta.copy(), "adam_m": self._m.copy(),
                        "adam_v": self._v.copy(), "arch_steps": int(self._arch_steps),
                        "validation_batches": int(self._val_used),
                        "final_counts": None if self.final_counts is None else self.final_counts.copy()}
        if self.final_counts is not None:  # the channel decision itself: a resume must not re-decide it
            state["dsa"]["channel_keep"] = {k: np.asarray(v, np.int64) for k, v in self.channel_keep.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        own = state.get("dsa") if isinstance(state, dict) else None
        if not isinstance(own, dict):
            raise PlanError("dsa state has no 'dsa' entry: not a state saved by DSAPruner.state_dict")
        alpha = np.asarray(own["alpha"], dtype=np.float64)
        if alpha.shape != self.alpha.shape:
            raise PlanError(f"dsa state has {alpha.size} keep ratios, this model has {self.alpha.size} channel groups")
        self.alpha = alpha.copy()
        self.theta = np.asarray(own["theta"], dtype=np.float64).copy()
        self._m = np.asarray(own["adam_m"], dtype=np.float64).copy()
        self._v = np.asarray(own["adam_v"], dtype=np.float64).copy()
        self._arch_steps = int(own["arch_steps"])
        self._val_skip = int(own.get("validation_batches", 0))
        self._val_used = self._val_skip
        if own.get("final_counts") is not None:
            counts = np.asarray(own["final_counts"], dtype=np.int64)
            keep = own.get("channel_keep")
            if isinstance(keep, dict):  # the saved decision, not one re-made from the weights of now
                self._restore_decision(counts, keep)
            else:  # a checkpoint from before decisions were saved
                self.alpha = counts / self.flops_model.sizes
                self._finalize()
