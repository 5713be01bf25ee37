"""TRP: Trained Rank Pruning (Xu et al., IJCAI 2020).

Low-rank decomposition folded into training, so the trained network decomposes with
negligible loss and no fine-tuning.

* Layers: every k×k conv with k > 1 except the stem (the first conv); 1×1 convs and linear
  layers are left alone.
* Every ``every`` steps (the release's m), per layer, on the matrix view of ``scheme``
  ("channel" = NC, "spatial" = VH; see :mod:`prunekit.lowrank`): r = the smallest rank with
  Σ_{i≤r} σ_i² ≥ e·E; the weight is replaced by its rank-r truncation (the TRP projection) at
  the start of the step, so the step's gradient is taken at the rank-r weights, and
  λ·U_r V_rᵀ (the nuclear-norm sub-gradient of the truncated factors) is added to that gradient
  before the optimizer steps: W ← T(W) − η(∇f(T(W)) + λ U_r V_rᵀ). (A decision: the
  specification does not say whether the step's gradient is taken before or after the
  projection; after it, the network trains in the low-rank space it will be decomposed into.)
* Final decomposition (:func:`decomposition_factors`): keep singular values ≥ ``threshold``
  (0.05, the release's) — or a fixed ``rank`` / ``energy`` — and split each layer into two convs.
  NC: conv r×C_in×kh×kw (the original stride and padding) then 1×1 conv C_out×r (with the
  original bias). VH: conv r×C_in×kh×1 (vertical stride/padding) then conv C_out×r×1×kw
  (horizontal stride/padding). Strided convs are decomposed too, the stride going on the
  factors as just said (the release only decomposes stride-1 convs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ..errors import ConfigError
from ..lowrank import (METHODS, SCHEMES, SpectrumEngine, from_matrix_view, from_rank_ops, matrix_view, project_top,
                       rank_ops, to_rank_ops, top_factors)
from .rpg import RANK_ON
from ..selection import energy_rank, value_rank
from .base import Algorithm, tensors_from_numpy, tensors_to_numpy


@dataclass
class TRPConfig:
    energy: float = 0.9
    lam: float = 3e-4
    every: int = 1
    scheme: str = "channel"
    threshold: float = 0.05
    spectrum: str = "gram"
    refresh_every: int = 50
    rank_on: str = "auto"  # "device", "host" (NumPy), or "auto": the backend's preference

    def __post_init__(self):
        if self.rank_on not in RANK_ON:
            raise ConfigError(f"unknown rank_on {self.rank_on!r}; expected one of {', '.join(RANK_ON)}")
        if not (0.0 < self.energy <= 1.0):
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}")
        if not (self.lam >= 0.0 and math.isfinite(self.lam)):
            raise ConfigError(f"lam must be a non-negative number, got {self.lam!r}")
        if self.every < 1:
            raise ConfigError(f"every must be >= 1, got {self.every!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown TRP scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if self.spectrum not in METHODS:
            raise ConfigError(f"unknown spectrum method {self.spectrum!r}; expected one of {', '.join(METHODS)}")


class TRPPruner(Algorithm):
    name = "trp"

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
        self.rank_ops = rank_ops(self.ops, c.rank_on)
        self.engine = SpectrumEngine(self.rank_ops, c.spectrum, c.refresh_every)
        return self

    def before_step(self, step: int) -> None:
        # Projection before the forward pass: the step's gradient is taken at the rank-r weights,
        # W ← T(W) − η(∇f(T(W)) + λ·U_r V_rᵀ); and no host synchronisation in the middle of an
        # asynchronous (compiled) step.
        c = self.config
        self._pending = None
        if step % c.every != 0:
            return
        ops = self.rank_ops
        mats = {l.name: matrix_view(ops, to_rank_ops(self, self.handle.weight(l.name)), c.scheme) for l in self.layers}
        spectra = self.engine.spectra(mats, {n: self.ranks.get(n, 1) for n in mats})
        pending, projected = {}, {}
        for l in self.layers:
            spec = spectra[l.name]
            r = energy_rank(spec.s, c.energy, spec.total_energy)
            self.ranks[l.name] = r
            m = mats[l.name]
            if r == 0:
                continue
            if r < min(ops.shape(m)):  # the TRP projection: this step trains the rank-r weights
                truncated = from_matrix_view(ops, project_top(ops, m, spec, r), l.weight_shape, c.scheme)
                projected[l.name] = from_rank_ops(self, truncated, l.name)
            if c.lam > 0:
                u, _, vh = top_factors(ops, m, spec, r)
                pending[l.name] = from_rank_ops(
                    self, from_matrix_view(ops, ops.matmul(u, vh) * c.lam, l.weight_shape, c.scheme), l.name)
        self.handle.set_weights(projected)  # all layers at once (one call where the backend can)
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

    def describe(self) -> dict:
        c = self.config
        return {"energy": c.energy, "lam": c.lam, "every": c.every, "scheme": c.scheme, "spectrum": c.spectrum}

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["ranks"] = {n: int(k) for n, k in self.ranks.items()}
        d["pending"] = tensors_to_numpy(self.ops, self._pending)
        d["engine"] = self.engine.state_dict()
        return d

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ranks = {n: int(k) for n, k in state.get("ranks", {}).items()}
        self._pending = tensors_from_numpy(self.ops, state.get("pending"), self.handle.weight)
        if "engine" in state:
            like = self.handle.weight(self.layers[0].name) if self.rank_ops is self.ops else None
            self.engine.load_state_dict(state["engine"], like=like)


# ---------------------------------------------------------------------------------- decomposition
@dataclass
class ConvFactor:
    """One conv of a decomposition, as plain data a backend builds a layer from."""

    weight: np.ndarray          # (C_out, C_in, kh, kw)
    stride: tuple
    padding: tuple
    bias: Optional[np.ndarray] = None


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
