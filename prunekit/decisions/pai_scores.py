"""Pruning-at-initialization (PAI) scores, written once on the op contract: SNIP, GraSP, SynFlow.

Each scorer takes a :class:`~prunekit.contract.handle.ModelHandle` and returns one score tensor per scored
layer (conv/linear weights, in the model's layer order), in the backend's tensors. The model is
given back exactly as it came: every scorer snapshots the whole state (weights, BN parameters and
statistics) and the train/eval mode first and restores them afterwards, so BN running statistics
updated by train-mode forwards and SynFlow's |θ| weights leave no trace.

* SNIP (Lee et al. 2019): ``|θ ⊙ g|`` with ``g`` the mean gradient of the cross-entropy over a few
  batches of real data, model in train mode (BN batch statistics, as the GraSP release), or in eval
  mode with ``train=False`` (the Synaptic-Flow reference's default for every method).
* GraSP (Wang et al. 2020): ``θ ⊙ (H g)`` with logits divided by ``temperature`` (200), ``g`` the
  mean gradient over the batches and ``H`` the Hessian of the same mean loss with respect to the
  scored weights; low scores are pruned (the reference code removes the *highest* ``-θ ⊙ Hg``,
  the same thing). ``H g`` is the backend's Hessian-vector product
  (:meth:`~prunekit.contract.ops.Ops.hessian_vector_product`, second-order autograd: exact for the
  locally-linear ReLU network, as the reference code's double backward). A finite difference of
  gradients was tried and rejected: on ReLU/max-pool networks it is biased by the kinks a step
  crosses, whatever the step (40-120 % error, float64 too). MindSpore 2.10 on CPU has no reliable
  second-order gradients for max-pool and BatchNorm, so GraSP raises a clear error there.
  ``reinit_linear_seed``: the GraSP release scores a copy of the model whose linear layers are
  re-initialised (Xavier normal) first; here the linear weights are redrawn, seeded, for the scoring
  only (the model is restored afterwards).
* SynFlow (Tanaka et al. 2020): data-free. Every parameter and BN statistic is replaced by its
  absolute value, the model is put in eval mode (BN is then the fixed affine map of its
  statistics, as the reference code's default), an all-ones input of batch size 1 is fed, ``R`` is
  the sum of the outputs and the score is ``|θ ⊙ ∂R/∂θ|``. :func:`synflow_masks` iterates
  ``rounds`` times, keeping ``density^(t/rounds)`` of the weights after round ``t`` with one global
  threshold, scoring the masked weights each round. The per-round count is
  ``round(N·d^(t/rounds))`` (``round_rule="nearest"``) or the Synaptic-Flow reference's
  ``N − int((1 − d^(t/rounds))·N)`` (``"reference"``); the last round keeps ``keep`` either way.

Scores are computed in the model's float32. SynFlow's ``R`` grows like the product of the layers'
weight sums (about 1e24 on ResNet-20, 1e39 on ResNet-32, 1e70 on ResNet-56 at prunekit's
initialisation) and overflows float32 on deep models. When every bias, BN shift and BN mean is
zero (any model at prunekit's initialisation) the |θ| network is positively homogeneous in its
input, so both the all-ones input (for the forward pass) and the objective (for the backward pass)
are scaled by an exact power of two c = 2**-e (e = 0, 40, 80, 120) until R and every gradient are
finite: every score is multiplied by the same c² and the ranking is unchanged. A model with
nonzero biases scales the objective only. If no scale fits, :class:`~prunekit.errors.ModelError`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from prunekit.contract.handle import ModelHandle
from prunekit.contract.ops import Ops, Tensor
from prunekit.decisions.selection import global_topk_masks
from prunekit.errors import ConfigError, ModelError

SCORES = ("snip", "grasp", "synflow")
#: per-round keep counts of the iterative scores (:func:`round_keep`)
ROUND_RULES = ("nearest", "reference")
#: default GraSP temperature (the logits are divided by it)
GRASP_TEMPERATURE = 200.0

Batch = Tuple[np.ndarray, np.ndarray]


def cross_entropy(ops: Ops, logits: Tensor, labels: np.ndarray) -> Tensor:
    """Mean softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,), on the ops."""
    n, c = ops.shape(logits)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape[0] != n:
        raise ConfigError(f"{labels.shape[0]} labels for a batch of {n}")
    if labels.size and (labels.min() < 0 or labels.max() >= c):
        raise ConfigError(f"labels must be in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    onehot = ops.asarray(np.eye(c, dtype=np.float32)[labels], like=logits)
    m = ops.stop_gradient(ops.max(logits, axis=1, keepdims=True))
    lse = ops.log(ops.sum(ops.exp(logits - m), axis=1, keepdims=True)) + m
    return ops.mean(ops.sum((lse - logits) * onehot, axis=1))


class _Restore:
    """Snapshot a model's whole state and mode; give them back on exit (errors included)."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle

    def __enter__(self):
        self.state = self.handle.state_numpy()
        self.training = self.handle.set_training(True)
        self.handle.set_training(self.training)
        return self

    def __exit__(self, *exc):
        self.handle.load_state_numpy(self.state)
        self.handle.set_training(self.training)
        return False


def round_keep(total: int, keep: int, t: int, rounds: int, rule: str = "nearest") -> int:
    """Weights kept after round ``t`` of ``rounds`` on the way to ``keep`` of ``total``: the density
    ``d^(t/rounds)`` (d = keep/total) as ``round(N·density)`` ("nearest") or, as the Synaptic-Flow
    reference, ``N − int((1 − density)·N)`` ("reference"); exactly ``keep`` after the last round."""
    if rule not in ROUND_RULES:
        raise ConfigError(f"round_rule must be one of {', '.join(ROUND_RULES)}, got {rule!r}")
    if t >= rounds:
        return keep
    density = (keep / total) ** (t / rounds)
    k = int(math.floor(total * density + 0.5)) if rule == "nearest" else total - int((1.0 - density) * total)
    return max(k, keep)


def reinit_linear(handle: ModelHandle, seed: int) -> None:
    """Redraw every linear layer's weight, Xavier normal (std = sqrt(2 / (fan_in + fan_out))), from
    ``numpy.random.default_rng(seed)``: the GraSP release's re-initialisation before scoring."""
    rng = np.random.default_rng(seed)
    for layer in handle.layers:
        if layer.kind != "linear":
            continue
        fan_out, fan_in = int(layer.weight_shape[0]), int(np.prod(layer.weight_shape[1:]))
        w = rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), size=tuple(layer.weight_shape)).astype(np.float32)
        handle.set_weight(layer.name, handle.ops.asarray(w, like=handle.weight(layer.name)))


def _weight_params(handle: ModelHandle, layers: Sequence[str]) -> Dict[str, Tensor]:
    params = handle.parameters_by_name()
    out = {}
    for name in layers:
        key = f"{name}.weight"
        if key not in params:
            raise ModelError(f"layer {name!r} has no trainable weight parameter {key!r}")
        out[name] = params[key]
    return out


def _mean_gradient(handle: ModelHandle, layers: Sequence[str], batches: Sequence[Batch],
                   temperature: float = 1.0) -> Dict[str, Tensor]:
    """Mean over ``batches`` of the cross-entropy gradient (logits / temperature) by layer."""
    ops = handle.ops
    params = _weight_params(handle, layers)
    like = handle.weight(layers[0])
    total = None
    for x, y in batches:
        xt = ops.asarray(np.asarray(x, np.float32), like=like)

        def loss_fn(xt=xt, y=y):
            logits = handle.forward(xt)
            if temperature != 1.0:
                logits = logits / temperature
            return cross_entropy(ops, logits, y)

        _, grads = ops.value_and_grad(loss_fn, {n: params[n] for n in layers})
        total = grads if total is None else {n: total[n] + grads[n] for n in layers}
    scale = 1.0 / len(batches)
    return {n: total[n] * scale for n in layers}


def _check_batches(batches) -> List[Batch]:
    batches = list(batches)
    if not batches:
        raise ConfigError("SNIP and GraSP need at least one batch of data")
    return batches


def snip_scores(handle: ModelHandle, layers: Sequence[str], batches: Iterable[Batch],
                train: bool = True) -> Dict[str, Tensor]:
    """SNIP: ``|θ ⊙ g|`` with ``g`` the mean cross-entropy gradient over ``batches`` (BN in train
    mode, or eval mode with ``train=False``)."""
    batches = _check_batches(batches)
    ops = handle.ops
    with _Restore(handle):
        handle.set_training(train)
        g = _mean_gradient(handle, layers, batches)
        return {n: ops.abs(handle.weight(n) * g[n]) for n in layers}


def hessian_gradient_product(handle: ModelHandle, layers: Sequence[str], batches: Sequence[Batch],
                             temperature: float = GRASP_TEMPERATURE) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(g, H g)`` for the mean tempered cross-entropy over ``batches`` with respect to the
    layers' weights, by the backend's second-order autograd (:meth:`Ops.hessian_vector_product`)."""
    ops = handle.ops
    g = {n: ops.stop_gradient(v) for n, v in _mean_gradient(handle, layers, batches, temperature).items()}
    params = _weight_params(handle, layers)
    like = handle.weight(layers[0])
    total = None
    for x, y in batches:
        xt = ops.asarray(np.asarray(x, np.float32), like=like)

        def loss_fn(xt=xt, y=y):
            return cross_entropy(ops, handle.forward(xt) / temperature, y)

        hv = ops.hessian_vector_product(loss_fn, params, g)
        total = hv if total is None else {n: total[n] + hv[n] for n in layers}
    scale = 1.0 / len(batches)
    return g, {n: total[n] * scale for n in layers}


def grasp_scores(handle: ModelHandle, layers: Sequence[str], batches: Iterable[Batch],
                 temperature: float = GRASP_TEMPERATURE, train: bool = True,
                 reinit_linear_seed: int | None = None) -> Dict[str, Tensor]:
    """GraSP: ``θ ⊙ (H g)`` (BN in train mode unless ``train=False``, logits / temperature; linear
    layers redrawn first with ``reinit_linear_seed``); the lowest scores are pruned."""
    batches = _check_batches(batches)
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    with _Restore(handle):
        if reinit_linear_seed is not None:
            reinit_linear(handle, reinit_linear_seed)
        handle.set_training(train)
        _, hg = hessian_gradient_product(handle, layers, batches, temperature)
        return {n: handle.weight(n) * hg[n] for n in layers}


#: SynFlow input scales tried on overflow: 2**-e for e in these steps (exact in binary floats)
SYNFLOW_SCALE_STEP = 40
SYNFLOW_MAX_SCALE_EXP = 120


def _homogeneous(state: Dict[str, np.ndarray]) -> bool:
    """True when every bias, BN shift and BN running mean is zero: the |θ| network in eval mode is
    then positively homogeneous of degree 1 in its input (ReLU/pooling of positive values, linear
    BN), so scaling the all-ones input by c scales R and every score by c and keeps the ranking."""
    for k, v in state.items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("bias", "running_mean") and np.any(v != 0):
            return False
    return True


def _synflow_round(handle: ModelHandle, layers: Sequence[str], params: Dict[str, Tensor], ones: Tensor,
                   exponent: int, homogeneous: bool) -> Tuple[Dict[str, Tensor], int]:
    """One SynFlow scoring pass with the objective scaled by ``c = 2**-exponent`` and, for a
    homogeneous model, the input too (see the module docstring). The exponent moves in steps of
    :data:`SYNFLOW_SCALE_STEP` while R or a gradient overflows float32 (or R underflows below
    2**-60). Returns the scores (scaled by a common power of two) and the exponent used."""
    ops = handle.ops
    tried = set()
    while True:
        tried.add(exponent)
        c = float(2.0 ** -exponent)
        x = ones * c if homogeneous else ones

        def objective(x=x, c=c):
            return ops.sum(handle.forward(x)) * c

        r, grads = ops.value_and_grad(objective, params)
        # one host sync: a NaN/Inf anywhere (or a sum that overflows: rescaling is then safe too)
        check = None
        for n in layers:
            part = ops.sum(ops.abs(grads[n]))
            check = part if check is None else check + part
        finite = math.isfinite(r) and math.isfinite(ops.item(check))
        if finite and (r >= 2.0 ** -60 or exponent == 0):
            return {n: ops.abs(handle.weight(n) * grads[n]) for n in layers}, exponent
        nxt = exponent + (SYNFLOW_SCALE_STEP if not finite else -SYNFLOW_SCALE_STEP)
        if nxt in tried or not (0 <= nxt <= SYNFLOW_MAX_SCALE_EXP):
            hint = ("" if homogeneous else "; the model has nonzero biases or BN shifts, so its input cannot be "
                    "rescaled without changing the ranking (use score=snip or grasp)")
            raise ModelError(f"SynFlow: R = {r} on {handle.model_name} (scaled by 2**-{exponent}) is out of "
                             f"float32's range for every scale 2**-e, e in 0..{SYNFLOW_MAX_SCALE_EXP}{hint}")
        exponent = nxt


def synflow_masks(handle: ModelHandle, layers: Sequence[str], keep: int, rounds: int = 100,
                  round_rule: str = "nearest") -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Iterative SynFlow: ``(scores of the last round, masks keeping ``keep`` weights)``.

    Round ``t`` (1..rounds) scores the currently masked |θ| and keeps
    ``round(N · (keep/N)^(t/rounds))`` weights (``round_rule``, :func:`round_keep`; the last round
    exactly ``keep``) with one global
    threshold (:func:`~prunekit.decisions.selection.global_topk_masks`). The model is restored afterwards.
    """
    if int(rounds) < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds!r}")
    ops = handle.ops
    total = sum(ops.size(handle.weight(n)) for n in layers)
    if not (0 < keep <= total):
        raise ConfigError(f"SynFlow must keep between 1 and {total} weights, got {keep}")
    with _Restore(handle):
        state = handle.state_numpy()
        # |θ| for every parameter and statistic (BN statistics included, as the reference code)
        positive = {k: np.abs(v) for k, v in state.items()}
        homogeneous = _homogeneous(positive)
        handle.load_state_numpy(positive)
        handle.set_training(False)
        params = _weight_params(handle, layers)
        dense = {n: handle.weight(n) * 1.0 for n in layers}
        like = dense[layers[0]]
        shape = tuple(int(d) for d in handle.input_shape[-3:])
        ones = ops.ones((1,) + shape, like=like)
        masks = {n: ops.ones_like(dense[n]) for n in layers}
        scores, exponent = None, 0
        for t in range(1, int(rounds) + 1):
            for n in layers:
                handle.set_weight(n, dense[n] * masks[n])
            scores, exponent = _synflow_round(handle, layers, params, ones, exponent, homogeneous)
            masks = global_topk_masks(ops, scores, round_keep(total, keep, t, int(rounds), round_rule))
        return scores, masks


def synflow_scores(handle: ModelHandle, layers: Sequence[str]) -> Dict[str, Tensor]:
    """One round of SynFlow on the dense model (no iteration): ``|θ ⊙ ∂R/∂θ|``."""
    ops = handle.ops
    total = sum(ops.size(handle.weight(n)) for n in layers)
    scores, _ = synflow_masks(handle, layers, total, rounds=1)
    return scores


def score_masks(handle: ModelHandle, method: str, layers: Sequence[str], keep: int,
                batches: Iterable[Batch] | Callable[[], Iterable[Batch]] = (), rounds: int = 1,
                temperature: float = GRASP_TEMPERATURE, train: bool = True, round_rule: str = "nearest",
                reinit_linear_seed: int | None = None) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Scores and global-threshold masks keeping ``keep`` weights, for any of :data:`SCORES`.

    SNIP and GraSP with ``rounds > 1`` iterate like SynFlow (masked weights rescored each round,
    same exponential schedule and ``round_rule``); the default, one round, is the papers' one-shot
    method. ``train``: BN mode of SNIP and GraSP (SynFlow always scores in eval mode);
    ``reinit_linear_seed``: GraSP only (:func:`grasp_scores`).
    """
    method = str(method).lower()
    if method not in SCORES:
        raise ConfigError(f"unknown PAI score {method!r}; expected one of {', '.join(SCORES)}")
    if method == "synflow":
        return synflow_masks(handle, layers, keep, rounds, round_rule)
    batches = _check_batches(batches() if callable(batches) else batches)
    ops = handle.ops
    total = sum(ops.size(handle.weight(n)) for n in layers)
    if not (0 < keep <= total):
        raise ConfigError(f"must keep between 1 and {total} weights, got {keep}")
    with _Restore(handle):
        if method == "grasp" and reinit_linear_seed is not None:  # before the masks of later rounds apply
            reinit_linear(handle, reinit_linear_seed)
        dense = {n: handle.weight(n) * 1.0 for n in layers}
        masks = {n: ops.ones_like(dense[n]) for n in layers}
        scores = None
        for t in range(1, int(rounds) + 1):
            for n in layers:
                handle.set_weight(n, dense[n] * masks[n])
            if method == "snip":
                scores = snip_scores(handle, layers, batches, train)
            else:
                scores = grasp_scores(handle, layers, batches, temperature, train)
            masks = global_topk_masks(ops, scores, round_keep(total, keep, t, int(rounds), round_rule))
        return scores, masks


def layer_densities(ops: Ops, masks: Dict[str, Tensor]) -> Dict[str, float]:
    """``d_l = kept / total`` weights per layer, counted from the masks."""
    out = {}
    for n, m in masks.items():
        arr = ops.to_numpy(m)
        out[n] = float(np.count_nonzero(arr > 0.5)) / float(arr.size)
    return out
