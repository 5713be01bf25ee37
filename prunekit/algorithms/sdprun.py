"""sDprun: structured directional pruning, as gRDA with group soft-thresholding over filters.

The update (ALGORITHMS.md section 4, the project's decision for the unreleased sDprun) keeps an
accumulator per managed weight, starting at the initial weight::

    A_n = w_0 - sum_{i<=n} gamma_i * grad f_i
    lambda_n = sum_{i<=n} c * gamma_i^(0.5+mu) * (i^mu - (i-1)^mu)   (= c * gamma^(0.5+mu) * n^mu for constant gamma)
    w_g = max(0, 1 - lambda_n * sqrt(|g|) / ||A_g||_2) * A_g          for every group g of entries

A group is one output channel (filter: a row along axis 0) of a producer layer
(``coupling="filter"``, the default), or one channel of a channel group taken jointly over all
its producers (``coupling="channel"``: A_g concatenates the filter of every producer and |g| is
their total number of entries, so coupled filters are zeroed together). The managed weights
are the conv/linear producers of *prunable* channel groups (:mod:`prunekit.decisions.channel_groups`);
everything else (BatchNorm, biases, depthwise convs, the logits layer) takes plain SGD steps
with the same gamma, which is the framework optimizer's job (SGD, lr = gamma, no momentum, no
weight decay, constant rate; :meth:`SDPrunPruner.trainer_overrides` says so to the job).

The math lives in the module-level functions (:func:`accumulate`, :func:`group_soft_threshold`,
:class:`LambdaSchedule`), written against :class:`~prunekit.contract.ops.Ops`, so that the algorithm
(driven through :mod:`prunekit.algorithms.base`) and the framework-native optimizers
(``backends/<fw>/optimizers.py``) run the same code. The lambda increments follow Chao et al.'s
released gRDA optimizer (step counter starting at 1, accumulator starting at w_0).

After training, a channel is removed when it is zero in every producer of its group; its
producers' biases, its BatchNorm scale and shift and its depthwise filters are zeroed so that
the masked model computes exactly what the compacted (physically narrower) model computes.
``channel_keep`` (group name -> kept indices) is what ``backend.compact`` takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.contract.ops import Ops, Tensor
from prunekit.errors import ConfigError, ModelError

COUPLINGS = ("filter", "channel")
UPDATE_ON = ("auto", "device", "host")
#: guards the division by a zero accumulator norm (its scale is 0 anyway)
_TINY = 1e-30


# ---------------------------------------------------------------------------- the math
def grda_lambda(c: float, mu: float, lr: float, n: int) -> float:
    """Closed form lambda_n = c * lr^(0.5+mu) * n^mu for a constant step size."""
    return float(c) * float(lr) ** (0.5 + float(mu)) * float(n) ** float(mu)


def lambda_increment(c: float, mu: float, lr: float, n: int) -> float:
    """lambda_n - lambda_{n-1} = c * lr^(0.5+mu) * (n^mu - (n-1)^mu), for step n >= 1."""
    return float(c) * float(lr) ** (0.5 + float(mu)) * (float(n) ** float(mu) - float(n - 1) ** float(mu))


class LambdaSchedule:
    """The threshold lambda_n, advanced once per step with that step's learning rate.

    Increments ``c * lr^(0.5+mu) * (n^mu - (n-1)^mu)`` sum to the closed form for a constant
    rate and follow a changed rate from the step it changes (as the released gRDA optimizer)."""

    def __init__(self, c: float, mu: float):
        self.c, self.mu = float(c), float(mu)
        self.n = 0
        self.value = 0.0

    def advance(self, lr: float) -> float:
        self.n += 1
        self.value += lambda_increment(self.c, self.mu, lr, self.n)
        return self.value

    def state_dict(self) -> dict:
        return {"n": self.n, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.value = int(state["n"]), float(state["value"])


def accumulate(ops: Ops, acc: Tensor, grad: Tensor, lr: float) -> Tensor:
    """A_n = A_{n-1} - lr * grad (a new tensor)."""
    return acc - grad * float(lr)


def group_norms(ops: Ops, tensors: Sequence[Tensor]) -> Tuple[Tensor, int]:
    """Joint L2 norm of row i (axis 0) over all ``tensors``, and the entries per group."""
    sq, size = None, 0
    rows = ops.shape(tensors[0])[0]
    for t in tensors:
        shape = ops.shape(t)
        if shape[0] != rows:
            raise ModelError(f"jointly thresholded tensors need the same number of rows, got {rows} and {shape[0]}")
        m = ops.reshape(t, (rows, -1))
        s = ops.sum(m * m, axis=1)
        sq = s if sq is None else sq + s
        size += int(np.prod(shape[1:], dtype=np.int64))
    return ops.sqrt(sq), size


def group_soft_threshold(ops: Ops, accs: Sequence[Tensor], lam: float) -> List[Tensor]:
    """w_g = max(0, 1 - lam * sqrt(|g|) / ||A_g||) * A_g, with g = row i of every tensor jointly.

    Computed as ``relu(||A_g|| - t) / max(||A_g||, tiny)`` with ``t = lam * sqrt(|g|)``, so a
    group whose norm is at or under the threshold (zero included) is exactly zero."""
    norm, size = group_norms(ops, accs)
    t = float(lam) * math.sqrt(size)
    scale = ops.clip(norm - t, 0.0, None) / ops.clip(norm, _TINY, None)
    out = []
    for a in accs:
        shape = ops.shape(a)
        out.append(a * ops.reshape(scale, (shape[0],) + (1,) * (len(shape) - 1)))
    return out


# ---------------------------------------------------------------------------- which weights
def managed_units(layers, groups, coupling: str = "filter", exclude: Sequence[str] = ()) -> List[Tuple[str, ...]]:
    """The thresholding units: tuples of layer names whose rows are thresholded together.

    Managed layers are the producers of prunable channel groups (conv/linear, not depthwise),
    minus ``exclude``, in model layer order. ``coupling="filter"``: one unit per layer;
    ``"channel"``: one unit per channel group (its managed producers)."""
    if coupling not in COUPLINGS:
        raise ConfigError(f"unknown coupling {coupling!r}; expected one of {', '.join(COUPLINGS)}")
    names = [l.name for l in layers]
    known = set(names)
    unknown = set(exclude) - known
    if unknown:
        raise ConfigError(f"exclude names unknown layer(s): {sorted(unknown)}")
    order = {n: i for i, n in enumerate(names)}
    units = []
    for g in groups:
        if not g.prunable:
            continue
        missing = [p for p in g.producers if p not in known]
        if missing:
            raise ModelError(f"channel group {g.name!r} names producer(s) {missing} that are not layers of this model")
        prods = tuple(sorted((p for p in g.producers if p in known and p not in exclude), key=order.get))
        if not prods:
            continue
        if coupling == "channel":
            units.append(prods)
        else:
            units.extend((p,) for p in prods)
    units.sort(key=lambda u: order[u[0]])
    return units


# ---------------------------------------------------------------------------- the algorithm
@dataclass
class SDPrunConfig:
    c: float = 5e-4          # threshold scale (spec: 0 < c <= 0.005; larger values prune faster)
    mu: float = 0.51         # threshold growth exponent, 0.5 < mu < 1
    lr: float = 0.1          # gamma: the constant step size of the accumulator (and of plain SGD)
    coupling: str = "filter"  # "filter": each producer's filters alone; "channel": jointly per channel group
    exclude: Sequence[str] = field(default_factory=tuple)  # layers left to plain SGD
    update_on: str = "auto"  # "device", "host" (NumPy), or "auto": the backend's preference

    def __post_init__(self):
        for key in ("c", "mu", "lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"sdprun {key} must be a finite number, got {v!r}")
            setattr(self, key, float(v))
        if self.c <= 0:
            raise ConfigError(f"sdprun c must be > 0, got {self.c}")
        if not 0.5 < self.mu < 1.0:
            raise ConfigError(f"sdprun mu must satisfy 0.5 < mu < 1, got {self.mu}")
        if self.lr <= 0:
            raise ConfigError(f"sdprun lr (gamma) must be > 0, got {self.lr}")
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"unknown coupling {self.coupling!r}; expected one of {', '.join(COUPLINGS)}")
        if self.update_on not in UPDATE_ON:
            raise ConfigError(f"unknown update_on {self.update_on!r}; expected one of {', '.join(UPDATE_ON)}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)


@register_algorithm
class SDPrunPruner(Algorithm):
    """gRDA with group soft-thresholding over filters, through the driver contract.

    Per step: ``transform_gradients`` moves the accumulators (A -= gamma * g); the framework
    optimizer then steps every parameter by plain SGD; ``after_step`` overwrites the managed
    weights with the thresholded accumulators (so whatever the optimizer did to them is
    discarded). ``groups`` (a list of :class:`prunekit.decisions.channel_groups.ChannelGroup`) defaults to
    ``find_channel_groups(handle)``."""

    name = "sdprun"
    config_class = SDPrunConfig
    #: transform_gradients only moves the accumulators; after_step writes the weights
    transform_reads_gradients_only = True

    def __init__(self, config: SDPrunConfig | None = None, groups: Optional[Sequence] = None, **kwargs):
        super().__init__()
        self.config = config or SDPrunConfig(**kwargs)
        self._given_groups = list(groups) if groups is not None else None
        self.groups: list = []
        self.units: List[Tuple[str, ...]] = []
        self.acc: Dict[str, Tensor] = {}
        self.schedule = LambdaSchedule(self.config.c, self.config.mu)
        self.channel_keep: Dict[str, np.ndarray] = {}
        self.summary: dict = {}

    def bind(self, handle, total_steps):
        if self._given_groups is not None:
            groups = self._given_groups
        else:
            from prunekit.decisions.channel_groups import find_channel_groups
            groups = find_channel_groups(handle)
        self.groups = list(groups)
        self.units = managed_units(handle.layers, self.groups, self.config.coupling, self.config.exclude)
        if not self.units:
            raise ModelError(f"{handle.model_name} has no prunable channel group with a conv/linear producer")
        super().bind(handle, total_steps)
        ops = self.ops
        # where the update runs: MindSpore on a CPU pays ~a millisecond per PyNative op, and the
        # update is a dozen small ops per layer, so it prefers the host (as RPG's rank term)
        from prunekit.decisions.spectrum import rank_ops
        self.uops = rank_ops(ops, self.config.update_on)
        self._host = self.uops is not ops
        # A_0 = w_0 (a copy: the weight itself is overwritten every step)
        self.acc = {l.name: self._to_u(handle.weight(l.name), copy=True) for l in self.layers}
        self.schedule = LambdaSchedule(self.config.c, self.config.mu)
        self.channel_keep, self.summary = {}, {}
        return self

    def _to_u(self, x, copy: bool = False):
        """A backend tensor in the update's ops (a host copy when those are NumPy's)."""
        if self._host:
            return self.ops.to_numpy(x)
        return self.ops.asarray(self.ops.to_numpy(x), like=x) if copy else x

    def select_layers(self, layers):
        managed = {n for u in self.units for n in u}
        return [l for l in layers if l.name in managed]

    def trainer_overrides(self) -> dict:
        """The framework optimizer the update assumes for the unmanaged parameters."""
        return {"optimizer": "sgd", "lr": self.config.lr, "momentum": 0.0, "weight_decay": 0.0,
                "lr_schedule": "constant"}

    @property
    def lam(self) -> float:
        return self.schedule.value

    # ------------------------------------------------------------------ per step
    def transform_gradients(self, step, grads):
        lr = self.config.lr
        for name in self.acc:
            g = grads.get(name)
            if g is not None:
                self.acc[name] = accumulate(self.uops, self.acc[name], self._to_u(g), lr)
        return grads

    def after_step(self, step):
        lam = self.schedule.advance(self.config.lr)
        for unit in self.units:
            new = group_soft_threshold(self.uops, [self.acc[n] for n in unit], lam)
            for n, w in zip(unit, new):
                if self._host:
                    w = self.ops.asarray(w, like=self.handle.weight(n))
                self.handle.set_weight(n, w)

    def step_with(self, grads: Dict[str, Tensor]) -> None:
        """One gRDA update of the managed weights from given gradients (no forward pass):
        what the driver's ``transform_gradients`` + ``after_step`` do, for tests and conformance."""
        self.transform_gradients(self.schedule.n, grads)
        self.after_step(self.schedule.n)

    @property
    def current_sparsity(self) -> float:
        """Fraction of the managed weights' entries that lie in all-zero filters (host sync)."""
        if self.handle is None:
            return 0.0
        zero, total = 0, 0
        for l in self.layers:
            nz = self._nonzero_rows(l.name)
            per_row = l.numel // l.weight_shape[0]
            zero += int((~nz).sum()) * per_row
            total += l.numel
        return zero / max(1, total)

    def _nonzero_rows(self, name: str) -> np.ndarray:
        w = self.ops.to_numpy(self.handle.weight(name))
        return np.any(w.reshape(w.shape[0], -1) != 0, axis=1)

    # ------------------------------------------------------------------ decisions
    @staticmethod
    def _fit(group, alive: np.ndarray, strength: np.ndarray) -> np.ndarray:
        """``alive`` widened to a keep the group's structure allows: as many in every block of a
        group feeding grouped convs (the most alive in any block), whole blocks of a GroupNorm
        (every block holding an alive channel). Channels kept only for that are kept as they are."""
        balanced, whole = int(getattr(group, "balanced", 1)), int(getattr(group, "whole", 1))
        if balanced <= 1 and whole <= 1:
            return alive
        from prunekit.decisions.channel_groups import fit_keep
        score = np.where(alive, 1.0 + strength, strength / (1.0 + strength.max()))  # alive channels first
        if whole > 1:
            count = int(alive.reshape(-1, whole).any(axis=1).sum()) * whole
        else:
            count = int(alive.reshape(balanced, -1).sum(axis=1).max()) * balanced
        out = np.zeros_like(alive)
        out[fit_keep(group, score, count)] = True
        if (alive & ~out).any():
            raise ModelError(f"sDprun: group {group.name!r} cannot keep its nonzero channels in equal blocks "
                             f"(balanced={balanced}, whole={whole})")
        return out

    def finish(self) -> None:
        """Channel decisions: a channel goes when it is zero in every producer of its group; its
        biases, BN scale/shift and depthwise filters are zeroed so the model equals the compacted one."""
        ops, h = self.ops, self.handle
        managed = {l.name for l in self.layers}
        nonzero = {l.name: self._nonzero_rows(l.name) for l in self.layers}
        keep: Dict[str, np.ndarray] = {}
        zero_filters = sum(int((~v).sum()) for v in nonzero.values())
        total_filters = sum(v.size for v in nonzero.values())
        removed_total, channels_total, forced = 0, 0, []
        state = h.state_numpy()
        changed = False
        for g in self.groups:
            if not g.prunable:
                continue
            prods = [p for p in g.producers if p in managed]
            if not prods:
                continue
            alive = np.zeros(g.size, bool)
            rows = {p: g.out_index(p, np.arange(g.size)) for p in g.producers}
            for p in g.producers:
                alive |= nonzero[p][rows[p]] if p in nonzero else True
            strength = np.zeros(g.size)
            for p in prods:
                acc = self.uops.to_numpy(self.acc[p]).astype(np.float64)
                strength += np.square(acc.reshape(acc.shape[0], -1)[rows[p]]).sum(axis=1)
            if not alive.any():  # never empty a group: keep its channel of largest accumulator norm
                alive[int(np.argmax(strength))] = True
                forced.append(g.name)
            alive = self._fit(g, alive, strength)
            kept = np.flatnonzero(alive)
            keep[g.name] = kept
            channels_total += g.size
            gone = ~alive
            removed_total += int(gone.sum())
            if gone.any():
                names = [f"{p}.bias" for p in g.producers] + [f"{d}.weight" for d in g.depthwise]
                names += [f"{d}.bias" for d in g.depthwise]
                names += [f"{b}.{k}" for b in g.norms for k in ("weight", "bias")]
                idx = np.flatnonzero(gone)
                for key in names:
                    if key in state:
                        layer = key.rsplit(".", 1)[0]
                        at = g.in_index(layer, idx) if layer in g.norms else g.out_index(layer, idx)
                        arr = np.array(state[key], copy=True)
                        arr[at] = 0
                        state[key] = arr
                        changed = True
        if changed:
            h.load_state_numpy(state, strict=True)
        self.channel_keep = keep
        # the plan's masks: the kept channels of every managed layer
        masks = {}
        for l in self.layers:
            row = None
            for g in self.groups:
                if l.name in g.producers and g.name in keep:
                    if row is None:
                        row = np.ones(l.weight_shape[0], np.float32)
                    part = np.zeros(g.size, np.float32)
                    part[keep[g.name]] = 1.0
                    row[g.out_index(l.name, np.arange(g.size))] = part
            if row is None:
                continue
            m = np.broadcast_to(row.reshape((-1,) + (1,) * (len(l.weight_shape) - 1)), l.weight_shape)
            masks[l.name] = ops.asarray(np.ascontiguousarray(m, dtype=np.float32), like=h.weight(l.name))
        self.set_masks(masks)
        self.summary = {
            "steps": self.schedule.n, "lambda": self.schedule.value,
            "zero_filters": zero_filters, "filters": total_filters,
            "filter_sparsity": zero_filters / max(1, total_filters),
            "channels_removed": removed_total, "channels": channels_total,
            "channel_sparsity": removed_total / max(1, channels_total),
            "groups_kept_one_channel": forced,
        }

    def describe(self) -> dict:
        c = self.config
        out = {"c": c.c, "mu": c.mu, "lr": c.lr, "coupling": c.coupling, "update_on": self.uops.name if self.handle else c.update_on,
               "managed_layers": [l.name for l in self.layers]}
        out.update(self.summary)
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["accumulators"] = {n: self.uops.to_numpy(a) for n, a in self.acc.items()}
        out["lambda"] = self.schedule.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for n, a in state["accumulators"].items():
            if n not in self.acc:
                raise ModelError(f"checkpoint has an accumulator for {n!r}, which sdprun does not manage here")
            self.acc[n] = self._to_u(self.ops.asarray(np.asarray(a, np.float32), like=self.handle.weight(n)), copy=True)
        self.schedule.load_state_dict(state["lambda"])
