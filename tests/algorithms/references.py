"""Reference rules shared by several tests, written independently of prunekit (float64 / Decimal)."""
from decimal import ROUND_HALF_UP, Decimal

import numpy as np


def keep(n, sparsity):
    """How many of ``n`` weights a sparsity keeps: round-half-up of n * (1 - sparsity), the
    sparsity read as the decimal it prints as."""
    return int((n * (1 - Decimal(repr(float(sparsity))))).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ref_topk(scores, k):
    """The documented tie rule: keep the k largest scores, ties to the lower flat index."""
    flat = np.asarray(scores, np.float64).reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    out = np.zeros(flat.size, bool)
    out[order[:k]] = True
    return out.reshape(np.shape(scores))
