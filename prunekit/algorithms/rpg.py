"""RPG: rank-based adversarial unstructured pruning (Tian et al., NeurIPS 2023).

At high sparsity, magnitude pruning leaves nearly low-rank weight matrices. RPG adds an
adversarial rank term that pushes every conv weight away from its best low-rank approximation:

* per conv layer (stem and 1×1 shortcuts included; linear layers get no rank term):
  Mn = M / ‖M‖_F (M the channel matrix view; layers with ‖M‖_F = 0 are skipped), k = the rank
  whose residual energy Σ_{i>k} σ_i² of Mn is closest to ``partial_k`` (ties → larger k),
  Ŵ = best rank-k approximation of Mn (held constant), ℓ = −‖Mn − Ŵ‖²_F;
* L_rank = mean of ℓ over the layers; loss = L_task + λ·L_rank.

Departures from the authors' release, offered as settings (docs/DECISIONS.md, "Departures from the
released code"): ``rank_below_full`` (the release caps k at min(m, n) − 1, so every layer keeps a
term), ``rank_mean`` ("nonzero": the release's mean over the layers whose term is not zero),
``density_lag`` (1: the release's exponential schedule, one update behind prunekit's). The ranks
reported (``ranks``, the plan) are those of the final weights, recomputed by :meth:`RPGPruner.finish`.

The gradient of ℓ needs no autograd through the SVD. With R = Mn − Ŵ = (I − U_kU_kᵀ)Mn and
G = ∂ℓ/∂Mn = −2R, the chain rule through the normalisation gives
∂ℓ/∂M = (G − ⟨G, Mn⟩ Mn) / ‖M‖_F = 2(‖R‖² Mn − R) / ‖M‖_F   (since ⟨R, Mn⟩ = ‖R‖²).

Pruning schedule (the release's): dense start; every ``frequency`` steps until
``end_fraction`` of training, one global magnitude threshold over all weighted layers at the
exponential density D^(u/U), then RigL drop/grow per layer: drop the fraction
α/2·(1 + cos(π t / T_end)) of the layer's active weights with the smallest |w|, grow as many
inactive ones with the largest |dense gradient| (not the ones just dropped — a decision, so a
drop always moves the mask), regrown weights set to zero together with their optimizer state.
The dense gradient is that of the whole loss, task + λ·rank term, in both semantics.

Semantics (``semantics``):
* ``"paper"`` (default): the rank term is added to the gradient every ``rank_every`` steps.
* ``"release"`` (the authors' released code): the rank term is computed only in the step
  before each mask update, where the optimizer step is skipped; it acts only through the
  regrowth score (the dense gradient of task + λ·rank loss).

The spectra come from :class:`prunekit.decisions.spectrum.SpectrumEngine` (``spectrum`` = "exact",
"gram" or "subspace"), batched over same-shape layers. ``rank_on`` chooses where the rank term
is computed: on the framework's device, or on the host with NumPy (``"auto"`` asks the backend:
MindSpore on a CPU prefers the host, whose small-op overhead is far lower than PyNative's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from prunekit.algorithms.base import Algorithm, tensors_from_numpy, tensors_to_numpy
from prunekit.algorithms.magnitude import magnitude_masks
from prunekit.algorithms.registry import register_algorithm
from prunekit.decisions.schedules import SparsitySchedule
from prunekit.decisions.selection import check_sparsity, residual_rank, topk_mask
from prunekit.decisions.spectrum import from_rank_ops, matrix_view, to_rank_ops
from prunekit.decisions.spectrum_tracking import (
    batch_scalars, bind_rank_machinery, check_rank_settings, load_rank_machinery, save_rank_machinery
)
from prunekit.errors import ConfigError

SEMANTICS = ("paper", "release")
RANK_MEANS = ("all", "nonzero")


@dataclass
class RPGConfig:
    sparsity: float = 0.9
    partial_k: float = 0.1
    lam: float = 0.5
    rank_every: int = 1
    semantics: str = "paper"
    frequency: int = 100
    end_fraction: float = 0.8
    drop_alpha: float = 0.3
    spectrum: str = "auto"  # "auto": tracked on an accelerator, gram on a CPU (prunekit.decisions.spectrum_tracking)
    refresh_every: Optional[int] = None  # subspace/tracked: exact solve every N steps (default 50/10)
    solve_lag: Optional[int] = None  # tracked: install each solve N steps later (default 8 on accelerators, else 0)
    rank_on: str = "auto"  # "device", "host" (NumPy), or "auto": the backend's preference
    rank_below_full: bool = False  # True: k <= min(m, n) - 1 (the release), so no layer's term vanishes
    rank_mean: str = "all"  # L_rank averaged over "all" conv layers, or "nonzero": those with a term (the release)
    density_lag: int = 0  # 1: the exponential density runs one update behind (the release)

    def __post_init__(self):
        self.sparsity = check_sparsity(self.sparsity)
        if not isinstance(self.rank_below_full, bool):
            raise ConfigError(f"rank_below_full must be true or false, got {self.rank_below_full!r}")
        if self.rank_mean not in RANK_MEANS:
            raise ConfigError(f"rank_mean must be one of {', '.join(RANK_MEANS)}, got {self.rank_mean!r}")
        if isinstance(self.density_lag, bool) or not isinstance(self.density_lag, int) or self.density_lag < 0:
            raise ConfigError(f"density_lag must be a non-negative integer, got {self.density_lag!r}")
        check_rank_settings(self)
        if not (0.0 < self.partial_k < 1.0):
            raise ConfigError(f"partial_k must be in (0, 1), got {self.partial_k!r}")
        if not (self.lam >= 0.0 and math.isfinite(self.lam)):
            raise ConfigError(f"lam must be a non-negative number, got {self.lam!r}")
        if self.semantics not in SEMANTICS:
            raise ConfigError(f"unknown RPG semantics {self.semantics!r}; expected one of {', '.join(SEMANTICS)}")
        if self.rank_every < 1 or self.frequency < 1:
            raise ConfigError("rank_every and frequency must be >= 1")
        if not (0.0 < self.end_fraction <= 1.0):
            raise ConfigError(f"end_fraction must be in (0, 1], got {self.end_fraction!r}")
        if not (0.0 <= self.drop_alpha < 1.0):
            raise ConfigError(f"drop_alpha must be in [0, 1), got {self.drop_alpha!r}")


def _per_matrix(ops, values: np.ndarray, like):
    """Host scalars, one per matrix of a stack, as a (B, 1, 1) tensor to broadcast against it."""
    return ops.reshape(ops.asarray(np.asarray(values, dtype=np.float32), like=like), (len(values), 1, 1))


@register_algorithm
class RPGPruner(Algorithm):
    name = "rpg"
    config_class = RPGConfig

    def __init__(self, config: RPGConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or RPGConfig(**kwargs)
        self.ranks: Dict[str, int] = {}
        self.rank_loss: Optional[float] = None
        self.current_sparsity = 0.0
        self._dense_scores: Dict[str, object] = {}
        self._pending: Optional[Dict[str, object]] = None  # terms computed in before_step

    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        c = self.config
        self.conv_layers = [l for l in self.layers if l.kind == "conv"]
        self.t_end = max(0, int(math.floor(c.end_fraction * max(0, self.total_steps - 1))))
        self.schedule = SparsitySchedule(c.sparsity, 0, self.t_end, c.frequency, "exponential", lag=c.density_lag)
        bind_rank_machinery(self, c)
        return self

    # ------------------------------------------------------------------ schedule
    def is_update_step(self, step: int) -> bool:
        return step > 0 and self.schedule.is_update_step(step)

    def needs_dense_gradients(self, step: int) -> bool:
        # release semantics computes its rank term only here, so it always asks
        return (self.config.drop_alpha > 0 or self.config.semantics == "release") and self.is_update_step(step + 1)

    def should_step_optimizer(self, step: int) -> bool:
        return not (self.config.semantics == "release" and self.is_update_step(step + 1))

    def before_step(self, step: int) -> None:
        if self.is_update_step(step):
            self.update_masks(step)
        c = self.config
        # The rank term depends on the weights alone, which do not change between here and the
        # optimizer step: computing it before the forward pass gives the same gradient and keeps
        # host synchronisation out of the middle of an asynchronous (compiled) step.
        self._pending = None
        if c.semantics == "paper" and c.lam > 0.0 and step % c.rank_every == 0:
            self._pending = self.rank_gradients(scale=c.lam)

    def finish(self) -> None:
        if abs(self.current_sparsity - self.config.sparsity) > 1e-12:
            self.set_masks(magnitude_masks(self.handle, self.layers, self.config.sparsity, "unstructured", "global"))
            self.current_sparsity = self.config.sparsity
        self.ranks.update(self.final_ranks())

    def final_ranks(self) -> Dict[str, int]:
        """k of every conv layer's final (masked) weights, by the rank rule, on the host in float64:
        the ranks reported, whatever step last computed the rank term."""
        out = {}
        for l in self.conv_layers:
            w = np.asarray(self.ops.to_numpy(self.handle.weight(l.name)), dtype=np.float64)
            s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)
            out[l.name] = self.rank_rule(s, float(np.sum(s * s)))
        return out

    # ------------------------------------------------------------------ gradients
    def observe_gradients(self, step: int, grads: Dict[str, object]) -> None:
        """Dense (unmasked) gradients of the step before a mask update: RigL's regrowth score."""
        scores = {n: grads[n] for n in grads if n in {l.name for l in self.layers}}
        # the dense gradient of the whole loss, task + λ·rank term, in both semantics
        if self.config.lam > 0:
            for n, g in self.rank_gradients(scale=self.config.lam).items():
                scores[n] = scores[n] + g
        self._dense_scores = {n: self.ops.abs(self.ops.stop_gradient(g)) for n, g in scores.items()}

    def transform_gradients(self, step, grads):
        pending, self._pending = self._pending, None
        if not pending:
            return grads
        for name, term in pending.items():
            if name in self.masks:
                term = term * self.masks[name]
            grads[name] = grads[name] + term
        return grads

    def gradient_terms(self, step):
        # transform_gradients only adds the masked rank term: a driver may fuse it
        pending, self._pending = self._pending, None
        return pending or {}

    def rank_gradients(self, scale: float = 1.0) -> Dict[str, object]:
        """``scale``·∂(L_rank)/∂W for every conv layer (L_rank the mean of ℓ over layers)."""
        if self.tracker is not None:
            return self._tracked_rank_gradients(scale)
        ops = self.rank_ops
        mats = {l.name: matrix_view(ops, to_rank_ops(self, self.handle.weight(l.name))) for l in self.conv_layers}
        shapes = {l.name: l.weight_shape for l in self.conv_layers}
        terms, loss = {}, 0.0
        # per shape group, on the stacked matrices: a few batched ops whatever the number of layers;
        # first the ranks and ‖R‖² of every layer (the mean's divisor may depend on them), then the terms
        groups = []
        for g in self.engine.group_spectra(mats, {n: self.ranks.get(n, 1) for n in mats}):
            b, q = g.s.shape
            full = min(ops.shape(g.stack)[1:])
            keep, inv, r2, coef = np.zeros((b, q)), np.zeros(b), np.zeros(b), np.zeros(b)
            for i, (name, s, e) in enumerate(zip(g.names, g.s, g.total_energy)):
                if e <= 0.0:  # an all-zero layer: no term (its rows of inv, r2, coef stay 0)
                    self.ranks[name] = 0
                    continue
                k = self.rank_rule(s, e, full)
                self.ranks[name] = k
                keep[i, :k] = 1.0
                inv[i] = 1.0 / math.sqrt(e)
                r2[i] = max(0.0, 1.0 - float(np.sum(s[:k] ** 2)) / e)  # ‖R‖² from the spectrum
                loss -= r2[i]
            groups.append((g, keep, inv, r2, coef))
        # a term is zero where the rank-k fit is exact: k = full rank (or an all-zero layer, k = 0)
        n_layers = self._mean_divisor(len(mats), [0 < self.ranks[n] < min(ops.shape(g.stack)[1:])
                                                  for g, *_ in groups for n in g.names])
        for g, keep, inv, r2, coef in groups:
            coef[:] = 2.0 * scale * inv / n_layers
            mn = g.stack * _per_matrix(ops, inv, g.stack)
            r = mn - g.weighted_projection(ops, mn, keep)  # R = Mn − U_k U_kᵀ Mn
            grad = (mn * _per_matrix(ops, r2, mn) - r) * _per_matrix(ops, coef, mn)
            for name, gi, e in zip(g.names, ops.unstack(grad), g.total_energy):
                if e > 0.0:
                    terms[name] = from_rank_ops(self, ops.reshape(gi, shapes[name]), name)
        self.rank_loss = loss / n_layers
        return {l.name: terms[l.name] for l in self.conv_layers if l.name in terms}

    def _mean_divisor(self, n_layers: int, has_term) -> int:
        """The number of layers L_rank is averaged over: all conv layers, or (``rank_mean="nonzero"``,
        the release) those with a term (``has_term``: 0 < k < full rank); at least 1."""
        if self.config.rank_mean == "nonzero":
            return max(1, sum(1 for t in has_term if t))
        return max(1, n_layers)

    def _tracked_rank_gradients(self, scale: float) -> Dict[str, object]:
        """The same gradient, per shape group on stacked matrices, with the bases and ranks of the
        last exact solve (:mod:`prunekit.decisions.spectrum_tracking`): no host read-back between solves. With an
        orthonormal basis Ŵ is an orthogonal projection of Mn, so ⟨Mn, R⟩ = ‖R‖² still holds."""
        ops, tracker = self.rank_ops, self.tracker
        mats = {l.name: matrix_view(ops, to_rank_ops(self, self.handle.weight(l.name))) for l in self.conv_layers}
        shapes = {l.name: l.weight_shape for l in self.conv_layers}
        out, loss = {}, 0.0
        stacks = tracker.stacks(mats, self.rank_rule)
        # the layers with a term at the last solve (the mean's divisor for rank_mean="nonzero")
        n_layers = self._mean_divisor(len(mats), [e > 0 and 0 < k < min(group.shape)
                                                  for group, _ in stacks for e, k in zip(group.energy, group.ranks)])
        factor = 2.0 * scale / n_layers
        for group, stack in stacks:
            energy = batch_scalars(ops, stack)
            # 1/‖M‖; for M = 0 any finite value gives the same zero term (mn = 0, R = 0), so no
            # mask of the zero matrices (three kernel launches per group saved)
            inv = 1.0 / ops.sqrt(ops.clip(energy, 1e-30, None))
            mn = stack * inv
            r = mn - tracker.project(group, mn)
            grad = (mn * batch_scalars(ops, r) - r) * (inv * factor)
            for (name, g), e in zip(tracker.unstack(group, grad).items(), group.energy):
                if e > 0:  # as the per-layer path: a zero layer (at the last solve) gets no term
                    out[name] = from_rank_ops(self, ops.reshape(g, shapes[name]), name)
            if tracker.solved_now:  # ranks and the loss change only at a solve (reading ‖R‖² back would stall)
                self.ranks.update(zip(group.names, group.ranks))
                for s, e, k in zip(group.s, group.energy, group.ranks):
                    loss -= max(0.0, 1.0 - float(np.sum(s[:k] ** 2)) / e) if e > 0 else 0.0
        if tracker.solved_now:
            self.rank_loss = loss / n_layers
        return out

    # ------------------------------------------------------------------ masks
    def update_masks(self, step: int) -> None:
        sparsity = self.schedule.sparsity_at(step)
        masks = magnitude_masks(self.handle, self.layers, sparsity, "unstructured", "global")
        frac = self.config.drop_alpha / 2.0 * (1.0 + math.cos(math.pi * step / max(1, self.t_end)))
        grown = {}
        if frac > 0 and self._dense_scores:
            for l in self.layers:
                if l.name in self._dense_scores:
                    masks[l.name], grown[l.name] = self._drop_grow(l.name, masks[l.name], self._dense_scores[l.name], frac)
        self._dense_scores = {}
        # regrown weights start from zero, their optimizer state (momentum, moments) too
        self.set_masks(masks, state_masks={n: m * (1.0 - grown[n]) if n in grown else m for n, m in masks.items()})
        self.engine.reset()  # the weights jumped: a warm-started subspace would be stale
        if self.tracker is not None:
            self.tracker.reset()
        for name, g in grown.items():
            self.handle.mul_weight_(name, 1.0 - g)
        self.current_sparsity = sparsity

    def _drop_grow(self, name: str, mask, score, frac: float):
        """RigL on one layer: returns (new mask, mask of the regrown weights)."""
        ops = self.ops
        active = int(round(ops.item(ops.sum(mask))))
        n_drop = min(int(frac * active), ops.size(mask) - active)
        if n_drop <= 0:
            return mask, ops.zeros_like(mask)
        w = ops.abs(self.handle.weight(name))
        is_active = ops.greater(mask, ops.zeros_like(mask))
        # keep the (active - n_drop) largest active weights; inactive ones score -1 (< any |w|)
        kept = topk_mask(ops, ops.where(is_active, w, ops.zeros_like(w) - 1.0), active - n_drop)
        # grow among the weights that were inactive (not the ones just dropped), by |dense gradient|
        grown = topk_mask(ops, ops.where(is_active, ops.zeros_like(score) - 1.0, score), n_drop)
        return kept + grown, grown

    # ------------------------------------------------------------------ output
    def plan(self):
        p = super().plan()
        p.ranks = dict(self.ranks)
        return p

    @property
    def target_sparsity(self) -> float:
        return self.config.sparsity

    def describe(self) -> dict:
        c = self.config
        return {"target_sparsity": c.sparsity, "partial_k": c.partial_k, "lam": c.lam, "semantics": c.semantics,
                "rank_every": c.rank_every, "spectrum": getattr(self, "spectrum", c.spectrum), "rank_loss": self.rank_loss}

    def rank_rule(self, s, total_energy: float, full: Optional[int] = None) -> int:
        """This algorithm's rank rule on a spectrum (the tracked path's solves use it, with the whole
        spectrum: ``full`` defaults to its length)."""
        cap = None
        if self.config.rank_below_full:
            cap = (len(s) if full is None else int(full)) - 1
        return residual_rank(s, self.config.partial_k, total_energy, max_rank=cap)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["ranks"] = {n: int(k) for n, k in self.ranks.items()}
        d["current_sparsity"] = float(self.current_sparsity)
        d["rank_loss"] = None if self.rank_loss is None else float(self.rank_loss)
        # regrowth scores gathered in the step before a mask update, used by the next step
        d["dense_scores"] = tensors_to_numpy(self.ops, self._dense_scores)
        d["pending"] = tensors_to_numpy(self.ops, self._pending)
        return save_rank_machinery(self, d)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ranks = {n: int(k) for n, k in state.get("ranks", {}).items()}
        self.current_sparsity = float(state.get("current_sparsity", 0.0))
        self.rank_loss = state.get("rank_loss")
        self._dense_scores = tensors_from_numpy(self.ops, state.get("dense_scores") or {}, self.handle.weight)
        self._pending = tensors_from_numpy(self.ops, state.get("pending"), self.handle.weight)
        load_rank_machinery(self, state)
