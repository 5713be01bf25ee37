"""Run the conformance cases on the available backends, compare, print and save a summary.

Each case runs once per backend. Its outputs are compared with the case's NumPy reference
(rows "<backend> vs numpy") and between every pair of backends (rows "mindspore vs torch", names sorted),
each with the tolerance the case declares for that output. The summary table is printed and
saved as ``summary.md`` and ``summary.json`` in the output folder; the exit status is 1 if any
row fails (or a backend could not run a case), else 0.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np

from prunekit.contract.backend import get_backend
from prunekit.errors import BackendUnavailable, ConfigError

from .cases import Case, Tol, all_cases


@dataclass
class Row:
    case: str
    group: str
    comparison: str
    outputs: int
    worst: str
    value: float
    tolerance: str
    passed: bool


def compare(a: np.ndarray, b: np.ndarray, tol: Tol):
    """(value, passed) for one output: mismatches, max excess error or agreement fraction."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf"), False
    if tol.kind == "exact":
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            mism = int(np.count_nonzero(~((a == b) | (np.isnan(a) & np.isnan(b)))))
        else:
            mism = int(np.count_nonzero(a != b))
        return float(mism), mism == 0
    if tol.kind == "agree":
        frac = float(np.mean(a == b)) if a.size else 1.0
        return frac, frac >= tol.min_agreement
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))  # NaN where only one side is NaN
    within = diff <= tol.atol + tol.rtol * np.where(both_nan, 0.0, np.abs(b64))  # False for NaN
    if tol.kind == "mostly_close":
        frac = float(np.mean(within)) if a.size else 1.0
        return frac, frac >= tol.min_agreement
    return (float(np.max(diff)) if diff.size else 0.0), bool(np.all(within))


def compare_outputs(case: Case, name: str, got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> Row:
    missing = sorted(set(want) ^ set(got))
    if missing:
        return Row(case.name, case.group, name, len(want), f"missing {missing[:2]}", float("inf"), "-", False)
    passed, worst_key, worst_val, worst_tol = True, "", None, case.default
    for key in sorted(want):
        tol = case.tol(key)
        value, ok = compare(got[key], want[key], tol)
        badness = (not ok, -value if tol.kind in ("agree", "mostly_close") else value)
        if worst_val is None or badness > worst_val[0]:
            worst_key, worst_val, worst_tol = key, (badness, value), tol
        passed &= ok
    return Row(case.name, case.group, name, len(want), worst_key, worst_val[1] if worst_val else 0.0,
               worst_tol.describe(), passed)


def run_cases(backends: List[str], select: Optional[str] = None, echo=print) -> List[Row]:
    modules = {}
    for b in backends:
        try:
            modules[b] = get_backend(b)
        except BackendUnavailable as e:
            echo(f"conformance: backend {b} unavailable: {e}")
    rows: List[Row] = []
    for case in all_cases():
        if select and select not in case.name:
            continue
        results = {}
        for b, mod in modules.items():
            t0 = time.perf_counter()
            try:
                results[b] = case.run(mod)
            except Exception as e:  # a backend that cannot run a case fails that case
                rows.append(Row(case.name, case.group, f"{b} raised", 0, f"{type(e).__name__}: {e}"[:120],
                                float("nan"), "-", False))
                traceback.print_exc(file=sys.stderr)
            else:
                echo(f"  {case.name} [{b}] {time.perf_counter() - t0:.2f}s")
        if case.reference is not None:
            ref = case.reference()
            for b, out in results.items():
                rows.append(compare_outputs(case, f"{b} vs numpy", out, ref))
        for b1, b2 in itertools.combinations(sorted(results), 2):
            rows.append(compare_outputs(case, f"{b1} vs {b2}", results[b1], results[b2]))
    for b in backends:
        if b not in modules:
            rows.append(Row("(all)", "-", f"{b} unavailable", 0, "-", float("nan"), "-", False))
    return rows


def format_table(rows: List[Row]) -> str:
    head = f"{'case':<52} {'comparison':<22} {'n':>4} {'worst output':<36} {'value':>10} {'tolerance':<18} result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:<44} {r.comparison:<22} {r.outputs:>4} {r.worst[:36]:<36} {r.value:>10.3g} "
                     f"{r.tolerance:<18} {'PASS' if r.passed else 'FAIL'}")
    n_fail = sum(not r.passed for r in rows)
    lines.append(f"{len(rows) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def save(rows: List[Row], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write("| case | comparison | outputs | worst output | value | tolerance | result |\n")
        f.write("| --- | --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            f.write(f"| {r.case} | {r.comparison} | {r.outputs} | {r.worst} | {r.value:.3g} | {r.tolerance} | "
                    f"{'PASS' if r.passed else 'FAIL'} |\n")


def check_request(backends: List[str], out: str, select: Optional[str] = None) -> None:
    """Refuse, before any case runs, a request that cannot check anything: no backend, an
    unknown backend name, a selection that matches no case, an output path that is a file."""
    from prunekit.contract.backend import check_backend_name

    if not backends:
        raise ConfigError("--backends names no backend")
    for b in backends:
        check_backend_name(b)
    if select is not None and not any(select in case.name for case in all_cases()):
        raise ConfigError(f"-k {select!r} matches no conformance case (case names look like "
                          f"{all_cases()[0].name!r})")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a file; name a folder for the summary")


def main(backends: List[str], out: str = "conformance-results", select: Optional[str] = None) -> int:
    check_request(backends, out, select)
    rows = run_cases(backends, select)
    table = format_table(rows)
    print(table)
    save(rows, out)
    print(f"summary saved to {os.path.join(out, 'summary.md')} and summary.json")
    return 0 if rows and all(r.passed for r in rows) else 1
