"""Fused multi-tensor paths of the PyTorch session (:mod:`.driver`): one ``torch._foreach_*``
launch for all layers instead of one op per layer (on a GPU each op is a kernel launch).

* :func:`mul_all_` — ``t *= m`` for every pair: gradient masking, weight masking.
* :func:`add_terms_` — an additive algorithm's terms
  (:meth:`prunekit.algorithms.base.Algorithm.gradient_terms`) onto the gradients in place:
  ``g += term·mask`` for a masked layer, ``g += term`` for an unmasked one. On gradients already
  masked this is the generic path's ``(g + term)·mask``, bit for bit.

The MindSpore twin (``backends/mindspore/fused.py``) does the same as compiled graphs.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


@torch.no_grad()
def mul_all_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """``t *= m`` for every pair, in place, in one multi-tensor op."""
    if tensors:
        torch._foreach_mul_(list(tensors), list(masks))


@torch.no_grad()
def add_terms_(grads: Dict[str, torch.Tensor], terms: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]) -> None:
    """``grads[n] += terms[n]·masks[n]`` (``+= terms[n]`` where ``n`` has no mask), in place,
    for every ``n`` in both ``grads`` and ``terms``."""
    names = [n for n in grads if n in terms]
    masked = [n for n in names if n in masks]
    plain = [n for n in names if n not in masks]
    if masked:
        torch._foreach_addcmul_([grads[n] for n in masked], [terms[n] for n in masked], [masks[n] for n in masked])
    if plain:
        torch._foreach_add_([grads[n] for n in plain], [terms[n] for n in plain])
