"""PreCropping (Cai et al. 2022): structured pruning at initialization, to a PAI method's layer densities.

Steps (ALGORITHMS.md section 5; the rules chosen are in docs/DECISIONS.md, "PreCropping"):

1. **Scores** at initialization (:mod:`prunekit.decisions.pai_scores`): SNIP, GraSP or SynFlow on the conv/linear
   weights of the *scored* layers: every prunable layer except shortcut convs (a layer whose
   name has a ``shortcut`` or ``downsample`` path component), unless ``score_shortcuts``.
   BN parameters and biases are never scored.
2. **Layer densities** ``d_l = kept / total`` from ONE global threshold over all scored layers
   (:func:`prunekit.decisions.selection.global_topk_masks`, the documented tie rule), keeping
   ``keep_count(N, sparsity)`` weights. These masks are also the unstructured baseline
   (``structure="unstructured"``): same scores, same count.
3. **Channel ratios** (:func:`solve_channel_ratios`): one unknown ``x_g = log r_g`` per prunable
   channel group (:func:`prunekit.decisions.channel_groups.find_channel_groups`; residual groups are one group,
   so they share one ratio); groups that are not prunable (the image, the logits, coupled
   channels) are fixed at ``r = 1``. Each scored layer gives one equation:
   ``x_in + x_out = log d_l`` for a conv/linear (fixed groups contribute 0), ``x_g = log d_l`` for a
   depthwise conv; ``d_l`` is floored at the density of one kept channel on each side. The
   system is solved by least squares (minimum-norm for groups no equation reaches), ``x`` is
   clipped to ``<= 0``.
4. **Budget match** (``match_params``, default on): one common offset ``δ`` is added to every
   ``x_g`` (then clipped to ``r <= 1``) and found by bisection so that the scored layers' weight
   count after compaction is the closest reachable to the PAI's kept count (ties: the smaller
   count). This keeps the least-squares *shape* and makes the narrow model's parameter count
   match the unstructured baseline's. Without it ``δ = 0``.
5. **Kept channels**: ``k_g = clip(ceil(r_g · C_g), 1, C_g)``; the kept channels are the ``k_g``
   with the largest summed score over the group's weights (producers' output rows, consumers'
   input columns, depthwise filters), ties to the lower index (the selection rule), sorted.
6. **Compaction** (``backend.compact``) builds the narrower dense model, re-initialised by the
   shared seeded initialisation at its new shapes (``reinit``, default) or keeping the sliced
   initial weights; it then trains normally with no algorithm.

Everything after the scores is NumPy on the host in float64 (a few hundred numbers), so
identical scores give identical densities, ratios and channels on every backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import register_algorithm
from prunekit.contract.layers import LayerInfo, signature
from prunekit.decisions.pai_scores import GRASP_TEMPERATURE, ROUND_RULES, SCORES, layer_densities, score_masks
from prunekit.decisions.plan import PruningPlan
from prunekit.decisions.channel_groups import fit_keep
from prunekit.decisions.selection import check_sparsity, keep_count, top_channels
from prunekit.errors import ConfigError, ModelError

STRUCTURES = ("channels", "unstructured")
#: path components that mark a shortcut (projection) conv, not scored by default
SHORTCUT_MARKERS = ("shortcut", "downsample")
#: SynFlow's default number of rounds (the paper's 100); SNIP and GraSP are one-shot by default
SYNFLOW_ROUNDS = 100


@dataclass
class PreCropConfig:
    sparsity: float = 0.9           # of the scored weights (the PAI's target)
    score: str = "synflow"          # snip | grasp | synflow
    rounds: Optional[int] = None    # None: 100 for synflow, 1 for snip/grasp
    batches: int = 4                # batches of training data for snip/grasp
    temperature: float = GRASP_TEMPERATURE
    structure: str = "channels"     # channels (PreCropping) | unstructured (PAI baseline, same scores)
    match_params: bool = True       # common offset so the narrow model meets the kept-weight count
    reinit: bool = True             # re-initialise the narrow model (else keep the sliced init weights)
    score_shortcuts: bool = False   # score 1x1 shortcut convs too
    exclude: Sequence[str] = field(default_factory=tuple)  # more layers not scored
    # departures from the released code (docs/DECISIONS.md): the releases' behaviour on request
    bn_mode: Optional[str] = None   # BN while scoring: None = "train" for snip/grasp, "eval" for synflow
    round_rule: str = "nearest"     # per-round keep count: "nearest" or "reference" (Synaptic-Flow's)
    reinit_linear: bool = False     # grasp: score with the linear layers redrawn (Xavier), as the GraSP release

    def __post_init__(self):
        self.sparsity = check_sparsity(self.sparsity)
        if self.sparsity <= 0.0:
            raise ConfigError(f"precrop sparsity must be in (0, 1), got {self.sparsity!r}")
        self.score = str(self.score).lower()
        if self.score not in SCORES:
            raise ConfigError(f"unknown precrop score {self.score!r}; expected one of {', '.join(SCORES)}")
        if self.rounds is None:
            self.rounds = SYNFLOW_ROUNDS if self.score == "synflow" else 1
        for key in ("rounds", "batches"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"precrop {key} must be an integer >= 1, got {v!r}")
        for key in ("temperature",):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or math.isinf(v):
                raise ConfigError(f"precrop {key} must be a positive number, got {v!r}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"unknown precrop structure {self.structure!r}; expected one of {', '.join(STRUCTURES)}")
        if self.bn_mode is None:
            self.bn_mode = "eval" if self.score == "synflow" else "train"
        if self.bn_mode not in ("train", "eval"):
            raise ConfigError(f"precrop bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        if self.score == "synflow" and self.bn_mode != "eval":
            raise ConfigError("precrop bn_mode='train' is not possible with score=synflow (its |θ| network scores "
                              "in eval mode); use snip or grasp")
        if self.round_rule not in ROUND_RULES:
            raise ConfigError(f"precrop round_rule must be one of {', '.join(ROUND_RULES)}, got {self.round_rule!r}")
        if self.reinit_linear is True and self.score != "grasp":
            raise ConfigError(f"precrop reinit_linear applies to score=grasp only, got score={self.score!r}")
        for key in ("match_params", "reinit", "score_shortcuts", "reinit_linear"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"precrop {key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)


def is_shortcut(name: str) -> bool:
    return any(part in SHORTCUT_MARKERS for part in name.split("."))


def scored_layers(layers: Sequence[LayerInfo], score_shortcuts: bool = False,
                  exclude: Sequence[str] = ()) -> List[LayerInfo]:
    """The layers whose weights are scored: all prunable layers but shortcuts and ``exclude``."""
    names = {l.name for l in layers}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ConfigError(f"precrop exclude names unknown layer(s) {', '.join(unknown)}")
    out = [l for l in layers if l.name not in set(exclude) and (score_shortcuts or not is_shortcut(l.name))]
    if not out:
        raise ConfigError("precrop: no layer left to score")
    return out


# ---------------------------------------------------------------------------------- group geometry
@dataclass(frozen=True)
class LayerGroups:
    """Which channel group a layer reads (``inp``) and writes (``out``); ``None``: fixed (r = 1)."""
    layer: str
    inp: Optional[str]
    out: Optional[str]
    depthwise: bool
    in_size: int
    out_size: int


def layer_groups(groups, layers: Sequence[LayerInfo]) -> Dict[str, LayerGroups]:
    """Map each layer to its input/output prunable groups (non-prunable groups map to None)."""
    prod, cons, dw = {}, {}, {}
    for g in groups:
        entry = (g.name if g.prunable else None, int(g.size))
        for p in g.producers:
            prod[p] = entry
        for c in g.consumers:
            cons[c] = entry
        for d in g.depthwise:
            dw[d] = entry
    out = {}
    for l in layers:
        if l.name in dw:
            g, size = dw[l.name]
            out[l.name] = LayerGroups(l.name, g, g, True, size, size)
        else:
            inp, in_size = cons.get(l.name, (None, l.in_channels))
            outp, out_size = prod.get(l.name, (None, l.out_channels))
            out[l.name] = LayerGroups(l.name, inp, outp, False, in_size, out_size)
    return out


def _kept_weights(layer: LayerInfo, lg: LayerGroups, counts: Dict[str, int]) -> Fraction:
    """Weights of ``layer`` left when its groups keep ``counts`` channels (exact)."""
    n = Fraction(layer.numel)
    if lg.depthwise:
        return n * Fraction(counts.get(lg.out, lg.out_size), lg.out_size) if lg.out else n
    if lg.out is not None:
        n *= Fraction(counts[lg.out], lg.out_size)
    if lg.inp is not None:
        n *= Fraction(counts[lg.inp], lg.in_size)
    return n


def kept_weight_count(layers: Sequence[LayerInfo], geometry: Dict[str, LayerGroups], counts: Dict[str, int]) -> int:
    """Total weights of ``layers`` after keeping ``counts[group]`` channels per group."""
    return int(sum(_kept_weights(l, geometry[l.name], counts) for l in layers))


def solve_log_ratios(groups, layers: Sequence[LayerInfo], densities: Dict[str, float]) -> Dict[str, float]:
    """Least-squares ``x_g = log r_g`` per prunable group from ``x_in + x_out = log d_l`` (module
    docstring, step 3); clipped to ``<= 0``."""
    prunable = [g for g in groups if g.prunable]
    index = {g.name: i for i, g in enumerate(prunable)}
    sizes = {g.name: int(g.size) for g in prunable}
    geometry = layer_groups(groups, layers)
    rows, rhs = [], []
    for l in layers:
        if l.name not in densities:
            continue
        lg = geometry[l.name]
        unknowns = [lg.out] if lg.depthwise else [g for g in (lg.inp, lg.out) if g is not None]
        unknowns = [g for g in unknowns if g is not None]
        if not unknowns:
            continue
        floor = 1.0
        for g in unknowns:
            floor /= sizes[g]
        row = np.zeros(len(prunable))
        for g in unknowns:
            row[index[g]] += 1.0
        rows.append(row)
        rhs.append(math.log(max(float(densities[l.name]), floor)))
    if not prunable:
        return {}
    if not rows:
        return {g.name: 0.0 for g in prunable}
    x = np.linalg.lstsq(np.asarray(rows), np.asarray(rhs), rcond=None)[0]
    return {g.name: float(min(0.0, x[index[g.name]])) for g in prunable}


def channel_counts(groups, log_ratios: Dict[str, float], offset: float = 0.0) -> Dict[str, int]:
    """``k_g = clip(ceil(C_g · min(1, exp(x_g + offset))), 1, C_g)`` per prunable group."""
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        r = min(1.0, math.exp(min(0.0, log_ratios[g.name] + offset)))
        out[g.name] = int(min(g.size, max(1, math.ceil(g.size * r - 1e-9))))
    return out


def match_offset(groups, layers: Sequence[LayerInfo], log_ratios: Dict[str, float], budget: int,
                 iterations: int = 80) -> float:
    """The common offset whose kept weight count is closest to ``budget`` (ties: the smaller)."""
    geometry = layer_groups(groups, layers)

    def count(off):
        return kept_weight_count(layers, geometry, channel_counts(groups, log_ratios, off))

    lo, hi = -60.0, 60.0
    if count(lo) > budget:
        return lo
    if count(hi) <= budget:
        return hi
    for _ in range(iterations):  # invariant: count(lo) <= budget < count(hi)
        mid = 0.5 * (lo + hi)
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo if budget - count(lo) <= count(hi) - budget else hi


def group_channel_scores(groups, scores: Dict[str, np.ndarray], layers: Sequence[LayerInfo] = ()) -> Dict[str, np.ndarray]:
    """Per prunable group, each channel's summed score (float64) over the scored layers' weights
    that touch it: producers' output rows, consumers' input columns (blocks of ``spatial``
    columns after a flatten) and depthwise filters, each read at the group's offset in that layer
    (a concatenation, a split). A grouped conv's input columns are its groups' columns side by side
    (``layers`` gives the conv groups; without it a layer is taken as ungrouped)."""
    conv_groups = {l.name: int(getattr(l, "groups", 1)) for l in layers}
    out = {}
    for g in groups:
        if not g.prunable:
            continue
        total = np.zeros(g.size)
        idx = np.arange(g.size)
        for p in g.producers + g.depthwise:
            if p in scores:
                s = np.asarray(scores[p], np.float64)
                total += s.reshape(s.shape[0], -1).sum(axis=1)[g.out_index(p, idx)]
        for c in g.consumers:
            if c in scores:
                s = np.asarray(scores[c], np.float64)
                n = conv_groups.get(c, 1)
                if s.ndim == 2:
                    cols = s.sum(axis=0)
                elif n > 1 and g.in_index(c, idx).max() >= s.shape[1]:  # grouped: (G, out/G, in/G, ...) -> in
                    cols = s.reshape(n, s.shape[0] // n, s.shape[1], -1).sum(axis=(1, 3)).ravel()
                else:
                    cols = s.sum(axis=(0, 2, 3))
                total += cols[g.in_index(c, idx)].reshape(g.size, -1).sum(axis=1)
        out[g.name] = total
    return out


@dataclass
class ChannelPlan:
    log_ratios: Dict[str, float]
    offset: float
    counts: Dict[str, int]
    keep: Dict[str, np.ndarray]
    budget: int
    kept_weights: int

    def ratios(self) -> Dict[str, float]:
        return {g: math.exp(min(0.0, x + self.offset)) for g, x in self.log_ratios.items()}


def plan_channels(groups, layers: Sequence[LayerInfo], densities: Dict[str, float], budget: int,
                  scores: Dict[str, np.ndarray], match_params: bool = True) -> ChannelPlan:
    """Steps 3-5 of the module docstring, on NumPy data (deterministic)."""
    layers = [l for l in layers if l.name in densities]
    x = solve_log_ratios(groups, layers, densities)
    offset = match_offset(groups, layers, x, budget) if match_params else 0.0
    counts = channel_counts(groups, x, offset)
    chan = group_channel_scores(groups, scores, layers)
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, k in counts.items():
        if k < len(chan[name]):
            kept = fit_keep(by_name[name], chan[name], k)  # as many per conv group, whole GroupNorm groups
            counts[name] = len(kept)
            if len(kept) < len(chan[name]):
                keep[name] = kept
    geometry = layer_groups(groups, layers)
    return ChannelPlan(x, offset, counts, keep, int(budget), kept_weight_count(layers, geometry, counts))


# ---------------------------------------------------------------------------------- the algorithm
@register_algorithm
class PreCropPruner(Algorithm):
    """PreCropping. The job calls :meth:`prepare` at initialization (``prunes_at_init``), then trains
    the model it returns with :meth:`training_algorithm` (None for the narrow dense model; the
    fixed masks for ``structure="unstructured"``)."""

    name = "precrop"
    config_class = PreCropConfig
    prunes_at_init = True

    def __init__(self, config: PreCropConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or PreCropConfig(**kwargs)
        self.scores: Dict[str, np.ndarray] = {}
        self.densities: Dict[str, float] = {}
        self.channel_plan: Optional[ChannelPlan] = None
        self.channel_keep: Dict[str, np.ndarray] = {}
        self.groups = []
        self._init_masks = None
        self._signature = None
        self.current_sparsity = 0.0

    def select_layers(self, layers):
        return scored_layers(layers, self.config.score_shortcuts, self.config.exclude)

    # -------------------------------------------------------------- scoring at initialization
    def score(self, handle, batches: Iterable = (), seed: int = 0) -> Dict[str, float]:
        """Scores and layer densities on ``handle`` (left unchanged); returns the densities.
        ``seed``: the linear layers' redraw of ``reinit_linear``."""
        cfg = self.config
        self.handle, self.ops = handle, handle.ops
        self.layers = self.select_layers(handle.layers)
        names = [l.name for l in self.layers]
        total = sum(l.numel for l in self.layers)
        keep = keep_count(total, cfg.sparsity)
        if keep < 1:
            raise ConfigError(f"sparsity {cfg.sparsity} keeps no weight of {total}")
        scores, masks = score_masks(handle, cfg.score, names, keep, batches, rounds=cfg.rounds,
                                    temperature=cfg.temperature, train=cfg.bn_mode == "train",
                                    round_rule=cfg.round_rule, reinit_linear_seed=seed if cfg.reinit_linear else None)
        self.scores = {n: self.ops.to_numpy(scores[n]) for n in names}
        self._init_masks = masks
        self.densities = layer_densities(self.ops, masks)
        self.budget = keep
        return self.densities

    def plan_channels(self, groups) -> ChannelPlan:
        self.groups = list(groups)
        self.channel_plan = plan_channels(self.groups, self.layers, self.densities, self.budget, self.scores,
                                          self.config.match_params)
        self.channel_keep = dict(self.channel_plan.keep)
        return self.channel_plan

    def prepare(self, handle, backend, batches: Iterable = (), seed: int = 0):
        """Score ``handle`` at initialization and return the model to train: a new narrow dense
        model (``structure="channels"``) or ``handle`` itself with the PAI masks to hold fixed."""
        from prunekit.decisions.channel_groups import compact, find_channel_groups

        self._signature = signature(handle.layers)
        self._model_name = handle.model_name
        self.score(handle, batches, seed)
        if self.config.structure == "unstructured":
            for n, m in self._init_masks.items():  # pruned from the start (the driver keeps them at zero)
                handle.mul_weight_(n, m)
            return handle
        self.plan_channels(find_channel_groups(handle))
        narrow = compact(handle, self.channel_keep)
        if self.config.reinit:
            narrow.initialize(seed)
        return narrow

    def training_algorithm(self):
        return self if self.config.structure == "unstructured" else None

    @property
    def scoring_batches(self) -> int:
        return self.config.batches

    @property
    def target_sparsity(self):
        """The PAI baseline's fixed masks have one; the narrow dense model has none."""
        return self.config.sparsity if self.config.structure == "unstructured" else None

    # -------------------------------------------------------------- unstructured baseline in training
    def bind(self, handle, total_steps):
        super().bind(handle, total_steps)
        if self._init_masks is None:
            raise ModelError("precrop: call prepare() (scores at initialization) before training")
        return self

    def before_step(self, step):
        if step == 0 or not self.masks:
            like = {l.name: self.handle.weight(l.name) for l in self.layers}
            self.set_masks({n: self.ops.asarray(self.ops.to_numpy(m), like=like[n])
                            for n, m in self._init_masks.items()})
            kept = sum(float(self.ops.to_numpy(m).sum()) for m in self._init_masks.values())
            self.current_sparsity = 1.0 - kept / sum(l.numel for l in self.layers)

    # -------------------------------------------------------------- output
    def describe(self) -> dict:
        cfg = self.config
        out = {"score": cfg.score, "rounds": cfg.rounds, "structure": cfg.structure, "sparsity": cfg.sparsity,
               "scored_layers": [l.name for l in self.layers],
               "layer_densities": {k: float(v) for k, v in self.densities.items()}}
        if self.channel_plan is not None:
            p = self.channel_plan
            out.update({"channel_ratios": {g: float(r) for g, r in p.ratios().items()},
                        "channels_kept": {g: int(k) for g, k in p.counts.items()},
                        "ratio_offset": float(p.offset), "target_weights": int(p.budget),
                        "kept_weights": int(p.kept_weights), "reinit": cfg.reinit})
        return out

    def plan(self) -> PruningPlan:
        if self.config.structure == "unstructured":
            return super().plan()
        return PruningPlan(model=self._model_name, algorithm=self.name, backend=self.ops.name,
                           layer_signature=self._signature, masks={},
                           kept_channels={g: [int(i) for i in k] for g, k in self.channel_keep.items()},
                           keep_ratios={g: float(r) for g, r in self.channel_plan.ratios().items()},
                           meta=self.describe())
