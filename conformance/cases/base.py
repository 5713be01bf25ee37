"""What a conformance case is: a function of a backend module returning named NumPy outputs,
an optional NumPy reference, and the tolerance each output is compared with."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

Outputs = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Tol:
    """How one output is compared: ``exact`` (bitwise), ``close`` (|a-b| <= atol + rtol |b|
    everywhere), ``agree`` (fraction of equal entries >= min_agreement) or ``mostly_close``
    (fraction of entries that are close >= min_agreement)."""

    kind: str = "exact"
    atol: float = 0.0
    rtol: float = 0.0
    min_agreement: float = 1.0

    def describe(self) -> str:
        if self.kind == "exact":
            return "bitwise"
        if self.kind == "agree":
            return f">= {self.min_agreement:.3%} equal"
        if self.kind == "mostly_close":
            return f">= {self.min_agreement:.2%} within {self.atol:g}"
        return f"atol {self.atol:g}" + (f", rtol {self.rtol:g}" if self.rtol else "")


@dataclass
class Case:
    name: str
    group: str
    run: Callable[[object], Outputs]
    reference: Optional[Callable[[], Outputs]] = None
    tolerances: Dict[str, Tol] = field(default_factory=dict)
    default: Tol = Tol("exact")

    def tol(self, key: str) -> Tol:
        for prefix, t in self.tolerances.items():
            if key == prefix or key.startswith(prefix + "/"):
                return t
        return self.default
