"""The conformance cases, one module per subject. Each case is written once as a function of a
backend module and returns named NumPy outputs; the runner compares them with a NumPy reference
(where one is given) and across backends, with the tolerance declared per output.

Groups (the first part of a case's name):
* ``ops``       every operation of the neutral API against NumPy (:mod:`.ops`);
* ``decisions`` masks and ranks from identical weights: bitwise identical masks, equal ranks;
* ``training``  k training steps from identical weights and batches: losses and masks.

Each subject module has a ``cases()`` function; :func:`all_cases` collects them in the order of
:data:`SUBJECTS`.
"""
from __future__ import annotations

from typing import List

from . import channel, dsa, magnitude, ops, precrop, resnet_b, rpg, sdprun, selection, trp
from .base import Case, Outputs, Tol

SUBJECTS = (ops, selection, rpg, trp, magnitude, sdprun, precrop, dsa, channel, resnet_b)

__all__ = ["Case", "Outputs", "SUBJECTS", "Tol", "all_cases"]


def all_cases() -> List[Case]:
    return [case for subject in SUBJECTS for case in subject.cases()]
