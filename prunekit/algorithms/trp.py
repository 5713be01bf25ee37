"""TRP: Trained Rank Pruning (Xu et al., IJCAI 2020).

Low-rank decomposition folded into training, so the trained network decomposes with
negligible loss and no fine-tuning.

* Layers: every k×k conv with k > 1 except the stem (the first conv); 1×1 convs and linear
  layers are left alone.
* Every ``every`` steps (the release's m), per layer, on the matrix view of ``scheme``
  ("channel" = NC, "spatial" = VH; see :mod:`prunekit.decisions.spectrum`): r = the smallest rank with
  Σ_{i≤r} σ_i² ≥ e·E; the weight is replaced by its rank-r truncation (the TRP projection) at
  the start of the step, so the step's gradient is taken at the rank-r weights, and
  λ·U_r V_rᵀ (the nuclear-norm sub-gradient of the truncated factors) is added to that gradient
  before the optimizer steps: W ← T(W) − η(∇f(T(W)) + λ U_r V_rᵀ). (A decision: the
  specification does not say whether the step's gradient is taken before or after the
  projection; after it, the network trains in the low-rank space it will be decomposed into.)
* ``scheme="nd"`` (network decoupling, the release's ``--type ND``, which its training script
  uses): the rank is taken per *filter*, of W[o] as a (C_in, kh·kw) matrix; each filter is
  projected to its own energy rank and gets its own λ·U_r V_rᵀ
  (:func:`prunekit.decisions.spectrum.nd_projection`; per-filter spectra are always exact, so
  ``spectrum`` must be "auto" or "gram"). The layer's rank is the largest filter rank, at most
  min(C_in, kh·kw). The decomposition keeps, per filter, the fewest values holding ``nd_energy``
  (0.85, the release's) of its energy, K = the largest of those, and builds K parallel paths of
  a pointwise conv then a depthwise conv (the release's ``network_decouple``), fused into two
  convs: a 1×1 conv C_in → K·C_out and a conv with C_out groups of K channels
  (:func:`prunekit.decisions.spectrum.nd_factors`). ``threshold`` (a value rule) is the
  channel/spatial schemes' and is refused with ``nd``.
* Final decomposition (:meth:`TRPPruner.final_transform`, :func:`plan_decompositions`,
  :func:`decomposition_factors`): keep singular values ≥ ``threshold`` (0.05 as in the release;
  ``prunekit run --decompose-threshold X`` and ``--set threshold=X`` both set it, > 0) — or a fixed
  ``rank`` / ``energy`` — and split each layer into two convs, which the backend's ``apply_decompositions`` builds.
  NC: conv r×C_in×kh×kw (the original stride and padding) then 1×1 conv C_out×r (with the
  original bias). VH: conv r×C_in×kh×1 (vertical stride/padding) then conv C_out×r×1×kw
  (horizontal stride/padding). Strided convs are decomposed too, the stride going on the
  factors as just said (the release only decomposes stride-1 convs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from prunekit.algorithms.base import Algorithm, FinalTransform, tensors_from_numpy, tensors_to_numpy
from prunekit.algorithms.registry import register_algorithm
from prunekit.decisions.flops import count_handle
from prunekit.decisions.selection import energy_rank, value_rank
from prunekit.decisions.spectrum import (SCHEMES, from_matrix_view, from_rank_ops, matrix_view, nd_factors,
                                        nd_projection, to_rank_ops)
from prunekit.decisions.spectrum_tracking import (
    bind_rank_machinery, check_rank_settings, load_rank_machinery, positive, save_rank_machinery
)
from prunekit.errors import ConfigError


@dataclass
class TRPConfig:
    energy: float = 0.9
    lam: float = 3e-4
    every: int = 1
    scheme: str = "channel"
    threshold: float = 0.05
    spectrum: str = "auto"  # "auto": tracked on an accelerator, gram on a CPU (prunekit.decisions.spectrum_tracking)
    refresh_every: Optional[int] = None  # subspace/tracked: exact solve every N steps (default 50/10)
    solve_lag: Optional[int] = None  # tracked: install each solve N steps later (default 8 on accelerators, else 0)
    rank_on: str = "auto"  # "device", "host" (NumPy), or "auto": the backend's preference
    nd_energy: float = 0.85  # scheme "nd": the decomposition's per-filter energy (the release's EnergyThreshold(0.85))

    def __post_init__(self):
        check_rank_settings(self)
        if not (0.0 < self.energy <= 1.0):
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}")
        if not (self.lam >= 0.0 and math.isfinite(self.lam)):
            raise ConfigError(f"lam must be a non-negative number, got {self.lam!r}")
        if self.every < 1:
            raise ConfigError(f"every must be >= 1, got {self.every!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown TRP scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        check_threshold(self.threshold)
        if not (0.0 < self.nd_energy <= 1.0):
            raise ConfigError(f"trp nd_energy must be in (0, 1], got {self.nd_energy!r}")
        if self.scheme == "nd" and self.threshold != TRPConfig.threshold:
            raise ConfigError(f"trp threshold={self.threshold!r} is the channel/spatial decomposition's value rule; the nd "
                              f"scheme keeps nd_energy of each filter's energy (set nd_energy instead)")
        if self.scheme == "nd" and self.spectrum not in ("auto", "gram"):
            raise ConfigError(f"trp spectrum={self.spectrum!r} with scheme nd: per-filter spectra are always exact; "
                              f"use auto or gram")


def check_threshold(threshold) -> float:
    """The decomposition's threshold: a positive, finite number (at 0 or below every singular
    value is kept and the two factors are larger than the layer)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < threshold < math.inf):
        raise ConfigError(f"trp threshold (--decompose-threshold) must be a positive number, got {threshold!r}")
    return float(threshold)


@register_algorithm
class TRPPruner(Algorithm):
    name = "trp"
    config_class = TRPConfig

    def __init__(self, config: TRPConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or TRPConfig(**kwargs)
        self.ranks: Dict[str, int] = {}
        self._pending: Optional[Dict[str, object]] = None  # terms computed in before_step

    def select_layers(self, layers):
        convs = [l for l in layers if l.kind == "conv"]
        stem = convs[0].name if convs else None
        return [l for l in convs if l.name != stem and min(l.kernel_size) > 1 and l.groups == 1]

    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        c = self.config
        bind_rank_machinery(self, c)
        return self

    def before_step(self, step: int) -> None:
        # Projection before the forward pass: the step's gradient is taken at the rank-r weights,
        # W ← T(W) − η(∇f(T(W)) + λ·U_r V_rᵀ); and no host synchronisation in the middle of an
        # asynchronous (compiled) step.
        c = self.config
        self._pending = None
        if step % c.every != 0:
            return
        if c.scheme == "nd":
            return self._nd_step()
        if self.tracker is not None:
            return self._tracked_step()
        ops = self.rank_ops
        mats = {l.name: matrix_view(ops, to_rank_ops(self, self.handle.weight(l.name)), c.scheme) for l in self.layers}
        shapes = {l.name: l.weight_shape for l in self.layers}
        pending, projected = {}, {}
        # per shape group, on the stacked matrices: a few batched ops whatever the number of layers
        for g in self.engine.group_spectra(mats, {n: self.ranks.get(n, 1) for n in mats}):
            b, q = g.s.shape
            full = min(ops.shape(g.stack)[1:])
            keep, inv_s = np.zeros((b, q)), np.zeros((b, q))
            ranks = [energy_rank(s, c.energy, e) for s, e in zip(g.s, g.total_energy)]
            for i, (name, s, r) in enumerate(zip(g.names, g.s, ranks)):
                self.ranks[name] = r
                keep[i, :r] = 1.0
                inv_s[i, :r] = 1.0 / np.maximum(s[:r], 1e-30)
            if any(0 < r < full for r in ranks):  # the TRP projection: this step trains the rank-r weights
                truncated = ops.unstack(g.weighted_projection(ops, g.stack, keep))  # U_r U_rᵀ M
                for name, t, r in zip(g.names, truncated, ranks):
                    if 0 < r < full:
                        projected[name] = from_rank_ops(self, from_matrix_view(ops, t, shapes[name], c.scheme), name)
            if c.lam > 0 and any(ranks):  # λ·U_r V_rᵀ = λ·U_r diag(1/σ) U_rᵀ M
                uv = ops.unstack(g.weighted_projection(ops, g.stack, inv_s) * c.lam)
                for name, t, r in zip(g.names, uv, ranks):
                    if r > 0:
                        pending[name] = from_rank_ops(self, from_matrix_view(ops, t, shapes[name], c.scheme), name)
        order = [l.name for l in self.layers]
        # all layers at once (one call where the backend can)
        self.handle.set_weights({n: projected[n] for n in order if n in projected})
        self._pending = {n: pending[n] for n in order if n in pending}

    def _nd_step(self) -> None:
        """The projection and nuclear term per filter (the ``nd`` scheme)."""
        ws = {l.name: to_rank_ops(self, self.handle.weight(l.name)) for l in self.layers}
        step = nd_projection(self.rank_ops, ws, self.rank_rule, self.config.lam)
        self.ranks.update(step.ranks)
        self.handle.set_weights({n: from_rank_ops(self, w, n) for n, w in step.projected.items()})
        self._pending = {n: from_rank_ops(self, t, n) for n, t in step.terms.items()}

    def _tracked_step(self) -> None:
        """Projection and nuclear term per shape group with the bases and ranks of the last exact
        solve (:mod:`prunekit.decisions.spectrum_tracking`). σ_j are the row norms of U_rᵀM for the current weights,
        so U_r V_rᵀ = U_r diag(1/σ) U_rᵀ M needs no host read-back."""
        c, ops, tracker = self.config, self.rank_ops, self.tracker
        mats = {l.name: matrix_view(ops, to_rank_ops(self, self.handle.weight(l.name)), c.scheme) for l in self.layers}
        shapes = {l.name: l.weight_shape for l in self.layers}
        projected, pending = {}, {}
        for group, stack in tracker.stacks(mats, self.rank_rule):
            coef = tracker.coefficients(group, stack)  # U_rᵀ M, rows beyond r zero
            full = min(group.shape)
            truncated = tracker.unstack(group, ops.matmul(group.basis, coef))
            if c.lam > 0:
                sigma = ops.sqrt(ops.sum(coef * coef, axis=2, keepdims=True))
                uv = ops.matmul(group.basis, coef * (positive(ops, sigma) / ops.clip(sigma, 1e-30, None)))
                terms = tracker.unstack(group, uv * c.lam)
            for name, r in zip(group.names, group.ranks):
                self.ranks[name] = r
                if r == 0:
                    continue
                if r < full:  # the TRP projection: this step trains the rank-r weights
                    projected[name] = from_rank_ops(self, from_matrix_view(ops, truncated[name], shapes[name], c.scheme), name)
                if c.lam > 0:
                    pending[name] = from_rank_ops(self, from_matrix_view(ops, terms[name], shapes[name], c.scheme), name)
        self.handle.set_weights(projected)
        self._pending = pending

    def transform_gradients(self, step, grads):
        """The nuclear-norm sub-gradient λ·U_r V_rᵀ on the projected layers' gradients."""
        pending, self._pending = self._pending, None
        for name, term in (pending or {}).items():
            if name in grads:
                grads[name] = grads[name] + term
        return grads

    def gradient_terms(self, step):
        # TRP sets no masks, so "masked like the gradient" is the plain sum: a driver may fuse it
        if self.masks:
            return None
        pending, self._pending = self._pending, None
        return pending or {}

    def plan(self):
        p = super().plan()
        p.ranks = dict(self.ranks)
        p.meta["scheme"] = self.config.scheme
        return p

    def final_transform(self, handle, backend, threshold: float) -> FinalTransform:
        """Split each trained low-rank conv into two convs, keeping the singular values >=
        ``threshold`` (None: the config's); the report section has the ranks, and parameters and MACs
        of both models."""
        threshold = check_threshold(self.config.threshold if threshold is None else threshold)
        before = count_handle(handle)
        nd = self.config.scheme == "nd"  # per-filter energy rule (the release's), not a value threshold
        decompositions = plan_decompositions(handle, self.config.scheme, threshold=None if nd else threshold,
                                             energy=self.config.nd_energy if nd else None,
                                             layers=[l.name for l in self.layers])
        new_handle = backend.apply_decompositions(handle, decompositions)
        after = count_handle(new_handle)
        section = {"scheme": self.config.scheme, "threshold": None if nd else threshold,
                   "ranks": {d.layer: d.rank for d in decompositions},
                   "params_before": before["total_params"], "params_after": after["total_params"],
                   "macs_before": before["dense_macs"], "macs_after": after["dense_macs"],
                   "flops_reduction": before["dense_macs"] / max(1, after["dense_macs"])}
        if nd:
            section["energy"] = self.config.nd_energy
        return FinalTransform("decomposition", new_handle, section)

    def describe(self) -> dict:
        c = self.config
        spectrum = "exact per filter" if c.scheme == "nd" else getattr(self, "spectrum", c.spectrum)
        return {"energy": c.energy, "lam": c.lam, "every": c.every, "scheme": c.scheme, "spectrum": spectrum}

    def rank_rule(self, s, total_energy: float) -> int:
        """This algorithm's rank rule on a spectrum (the tracked path's solves use it)."""
        return energy_rank(s, self.config.energy, total_energy)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["ranks"] = {n: int(k) for n, k in self.ranks.items()}
        d["pending"] = tensors_to_numpy(self.ops, self._pending)
        return save_rank_machinery(self, d)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ranks = {n: int(k) for n, k in state.get("ranks", {}).items()}
        self._pending = tensors_from_numpy(self.ops, state.get("pending"), self.handle.weight)
        load_rank_machinery(self, state)


# ---------------------------------------------------------------------------------- decomposition
@dataclass
class ConvFactor:
    """One conv of a decomposition, as plain data a backend builds a layer from."""

    weight: np.ndarray          # (C_out, C_in, kh, kw)
    stride: tuple
    padding: tuple
    bias: Optional[np.ndarray] = None
    groups: int = 1             # scheme "nd": the second conv has C_out groups


@dataclass
class Decomposition:
    layer: str
    scheme: str
    rank: int
    first: ConvFactor
    second: ConvFactor


def choose_rank(s: np.ndarray, threshold: Optional[float] = 0.05, rank: Optional[int] = None,
                energy: Optional[float] = None) -> int:
    """Rank kept by the final decomposition: a fixed rank, an energy, or a value threshold."""
    if rank is not None:
        return max(1, min(int(rank), len(s)))
    if energy is not None:
        return max(1, energy_rank(s, energy))
    return max(1, value_rank(s, threshold))


def decomposition_factors(weight: np.ndarray, bias: Optional[np.ndarray], stride, padding, scheme: str = "channel",
                          threshold: Optional[float] = 0.05, rank: Optional[int] = None,
                          energy: Optional[float] = None, layer: str = "") -> Decomposition:
    """Split a conv weight (C_out, C_in, kh, kw) into two convs whose composition is the
    truncated conv. Computed in float64 on the host; √σ is shared between the factors."""
    w = np.asarray(weight, dtype=np.float64)
    co, ci, kh, kw = w.shape
    sh, sw = stride
    ph, pw = padding
    if scheme == "nd":
        f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
        k, pointwise, grouped = nd_factors(w, lambda s: choose_rank(s, threshold, None, energy), rank)
        return Decomposition(layer, scheme, k, ConvFactor(f32(pointwise[:, :, None, None]), (1, 1), (0, 0)),
                             ConvFactor(f32(grouped), (sh, sw), (ph, pw), bias, groups=co))
    if scheme == "channel":
        m = w.reshape(co, ci * kh * kw)
    elif scheme == "spatial":
        m = w.transpose(1, 2, 0, 3).reshape(ci * kh, co * kw)
    else:
        raise ConfigError(f"unknown TRP scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    r = choose_rank(s, threshold, rank, energy)
    root = np.sqrt(s[:r])
    a = u[:, :r] * root          # (rows, r)
    b = root[:, None] * vh[:r]   # (r, cols)
    f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
    if scheme == "channel":
        first = ConvFactor(f32(b.reshape(r, ci, kh, kw)), (sh, sw), (ph, pw))
        second = ConvFactor(f32(a.reshape(co, r, 1, 1)), (1, 1), (0, 0), bias)
    else:
        # a: (ci*kh, r) -> first[j, c, h, 0] = a[c*kh + h, j];  b: (r, co*kw) -> second[o, j, 0, x] = b[j, o*kw + x]
        first = ConvFactor(f32(a.reshape(ci, kh, r).transpose(2, 0, 1)[..., None]), (sh, 1), (ph, 0))
        second = ConvFactor(f32(b.reshape(r, co, kw).transpose(1, 0, 2)[:, :, None, :]), (1, sw), (0, pw), bias)
    return Decomposition(layer, scheme, r, first, second)


def plan_decompositions(handle, scheme: str = "channel", threshold: Optional[float] = 0.05,
                        rank: Optional[int] = None, energy: Optional[float] = None,
                        layers: Optional[List[str]] = None) -> List[Decomposition]:
    """The two-conv factors of each of ``layers`` (default: every layer TRP works on) of
    ``handle``, from its current weights; the backend's ``apply_decompositions`` builds them."""
    state = handle.state_numpy()
    names = layers if layers is not None else [l.name for l in TRPPruner().select_layers(handle.layers)]
    out = []
    for name in names:
        info = handle.layer(name)
        out.append(decomposition_factors(state[f"{name}.weight"], state.get(f"{name}.bias"), info.stride, info.padding,
                                         scheme, threshold, rank, energy, layer=name))
    return out
