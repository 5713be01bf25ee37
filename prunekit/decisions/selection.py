"""Selection rules shared by every algorithm: top-k with the documented tie rule, rank choice.

The one rule (ALGORITHMS.md, "Common rules"): to keep k of N scores, order them by
(score descending, flat index ascending) and keep the first k. It is implemented here once,
on the neutral ops, without a sort of indices (whose tie handling differs between
frameworks): find the k-th largest *value* v, keep every score > v, then keep the scores
equal to v in ascending index order until k are kept. With identical scores in, every backend
therefore returns identical masks.

Rank choices from singular values are made on the host in float64 (the spectra are small). A
threshold met to within ``RANK_TOLERANCE`` counts as met, so the float32 noise between two
backends' SVDs (about 1e-7 relative) cannot move a rank that sits exactly on a threshold
(e.g. equal singular values with an energy target that is a multiple of 1/n).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Sequence

import numpy as np

from prunekit.contract.ops import Ops, Tensor
from prunekit.errors import ConfigError

#: slack for energy / residual-energy comparisons in rank choices (relative to total energy)
RANK_TOLERANCE = 1e-6


def keep_count(n: int, sparsity: float) -> int:
    """How many of ``n`` entries a target ``sparsity`` keeps: ``round(n * (1 - sparsity))``.

    Rounded half up in exact arithmetic on the density so that both backends agree. The
    sparsity is taken as the decimal Python prints for it (0.3 means 3/10, not the binary
    float just below it), so a half point such as 45 * 0.7 = 31.5 rounds up as documented.
    """
    density = 1 - Fraction(repr(check_sparsity(sparsity)))
    return int(math.floor(n * density + Fraction(1, 2)))


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(f"{name} must be in [0, 1), got {sparsity!r}")
    return value


def topk_mask(ops: Ops, scores: Tensor, k: int) -> Tensor:
    """A float32 mask of ``scores``' shape with exactly ``k`` ones, by the tie rule."""
    shape = ops.shape(scores)
    flat = ops.reshape(scores, (-1,))
    n = ops.size(flat)
    if k <= 0:
        return ops.zeros(shape, like=scores)
    if k >= n:
        return ops.ones(shape, like=scores)
    v = ops.kth_largest(flat, k)
    above = ops.greater(flat, v)
    tied = ops.equal(flat, v)
    n_above = ops.sum(ops.cast(above, "int32"))
    tie_rank = ops.cumsum(ops.cast(tied, "int32"), axis=0)  # 1-based position among ties
    need = ops.cast(k - n_above, "int32")
    keep = ops.logical_or(above, ops.logical_and(tied, ops.less_equal(tie_rank, need)))
    return ops.reshape(ops.cast(keep, "float32"), shape)


def global_topk_masks(ops: Ops, scores: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
    """Keep ``k`` entries over several score tensors together (one global threshold).

    The flat index of the tie rule runs over the tensors in the dict's order (prunekit
    uses the model's layer order), then within each tensor in row-major order.
    """
    names = list(scores)
    shapes = [ops.shape(scores[n]) for n in names]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    flat = ops.concat([ops.reshape(scores[n], (-1,)) for n in names], axis=0)
    mask = topk_mask(ops, flat, k)
    pieces = ops.split(mask, sizes)
    return {n: ops.reshape(p, s) for n, p, s in zip(names, pieces, shapes)}


def channel_scores(ops: Ops, weight: Tensor, kind: str = "l2") -> Tensor:
    """Per-output-channel score of a weight (axis 0): L2 ("l2") or L1 ("l1") norm."""
    shape = ops.shape(weight)
    mat = ops.reshape(weight, (shape[0], -1))
    if kind == "l1":
        return ops.sum(ops.abs(mat), axis=1)
    if kind == "l2":
        return ops.norm(mat, axis=1)
    raise ConfigError(f"unknown channel score {kind!r}; expected 'l1' or 'l2'")


def expand_channel_mask(ops: Ops, channel_mask: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """Broadcast a per-output-channel mask (C_out,) to a full weight mask."""
    ones = ops.ones(tuple(weight_shape), like=channel_mask)
    view = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return ones * ops.reshape(channel_mask, view)


def energy_rank(singular_values, energy: float, total_energy: float | None = None) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * total (first index meeting it).

    ``total_energy`` defaults to sum s_i^2; give ‖M‖_F² for a partial spectrum (if the known
    values do not reach the target, their count is returned). An all-zero spectrum has rank 0.
    """
    s = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    if not (0.0 < energy <= 1.0):
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    e = s * s
    total = e.sum() if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 0
    cum = np.cumsum(e) / total
    hits = np.nonzero(cum >= energy - RANK_TOLERANCE)[0]
    return int(hits[0] + 1) if hits.size else int(s.size)


def value_rank(singular_values, threshold: float) -> int:
    """Number of singular values >= ``threshold`` (S descending)."""
    s = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    return int(np.count_nonzero(s >= threshold))


def residual_rank(singular_values, partial_k: float, total_energy: float | None = None,
                  max_rank: int | None = None) -> int:
    """RPG's k: the rank whose residual energy sum_{i>k} s_i^2, as a fraction of the total,
    is closest to ``partial_k``; ties (within ``RANK_TOLERANCE``) go to the larger k.

    ``total_energy`` (‖M‖_F²) allows a partial spectrum: only k up to the number of known
    values are candidates then. ``max_rank`` caps the candidates (RPG's release: min(m, n) - 1,
    so the term never vanishes).
    """
    s = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    e = s * s
    total = e.sum() if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 0
    e = e / total
    # residual[k] = energy left after keeping the first k values, k = 0..len(s)
    residual = np.concatenate([[1.0], 1.0 - np.cumsum(e)])
    residual = np.maximum(residual, 0.0)
    dist = np.abs(residual - partial_k)
    best = dist.min()
    if max_rank is not None:
        dist = dist[:max(0, int(max_rank)) + 1]
        best = dist.min()
    candidates = np.nonzero(dist <= best + RANK_TOLERANCE)[0]
    return int(candidates.max())


def top_channels(scores, k: int) -> np.ndarray:
    """Host-side tie rule on a score vector: the indices of the ``k`` largest scores (score
    descending, index ascending), returned sorted ascending as int64 — kept channels."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.lexsort((np.arange(scores.size), -scores))
    return np.sort(order[:int(k)]).astype(np.int64)
