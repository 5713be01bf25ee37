"""Rank machinery without a host round trip per step: bases solved every N steps, reused between.

On a GPU, the eigen-solvers behind the ``gram``/``subspace`` spectra of :mod:`prunekit.decisions.spectrum`
cost several training steps each (ResNet-50 on one H100: Gram + eigh of every conv weight
274 ms against a 64 ms step), and reading their singular values back to choose ranks stalls the
device every step. The ``tracked`` method instead works per shape group on stacked matrices:

* every ``refresh_every`` calls (and on the first call, and after :meth:`BasisTracker.reset`)
  it solves exactly — the Gram matrix of the smaller side and its eigen-decomposition — and
  reads the spectrum to the host once, where the ranks are chosen by the algorithm's rule;
* on the other calls it reuses that basis: the rank-k projection is ``U_k U_kᵀ M`` with the
  stored ``U`` and ranks (two batched matmuls with only the columns in use), and nothing is
  read back to the host.

So ranks are those of the last exact solve (at most ``refresh_every - 1`` steps old), and the
projection uses a subspace that far behind the weights. The tests bound the effect on real
trained weights: the ranks equal full SVD's at the solve, and the best-rank-k approximation
drifts by a stated relative amount over ``refresh_every`` training steps. A rank is applied to a
whole stacked group at once by zeroing each matrix's basis columns beyond its rank, so one
group costs a fixed handful of batched operations whatever its number of layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import numpy as np

from prunekit.contract.ops import Ops, Tensor
from prunekit.errors import ConfigError


@dataclass
class TrackedGroup:
    """Same-shape matrices of several layers, stacked on their smaller side first."""

    names: Tuple[str, ...]
    shape: Tuple[int, int]      # each matrix's shape, as the caller gave it
    basis: Tensor = None        # (B, a, q) leading left singular vectors, columns beyond each rank zeroed
    host_basis: np.ndarray = None  # (B, a, a) all of them, descending (host; for checkpoints)
    s: np.ndarray = None        # (B, a) singular values at the last solve (host, float64)
    energy: np.ndarray = None   # (B,) ‖M‖_F² at the last solve (host, float64)
    ranks: List[int] = field(default_factory=list)

    @property
    def transposed(self) -> bool:
        """True when the stack holds Mᵀ (the caller's m > n)."""
        return self.shape[0] > self.shape[1]


#: per-method defaults when a config leaves ``refresh_every`` / ``solve_lag`` unset
DEFAULT_REFRESH = {"subspace": 50, "tracked": 10}
ACCELERATOR_SOLVE_LAG = 8
RANK_ON = ("auto", "device", "host")


def check_rank_settings(config) -> None:
    """Validate the rank-machinery settings RPG's and TRP's configs share: ``spectrum``,
    ``rank_on``, ``refresh_every`` and ``solve_lag``."""
    from prunekit.decisions.spectrum import METHODS

    if config.spectrum not in METHODS:
        raise ConfigError(f"unknown spectrum method {config.spectrum!r}; expected one of {', '.join(METHODS)}")
    if config.rank_on not in RANK_ON:
        raise ConfigError(f"unknown rank_on {config.rank_on!r}; expected one of {', '.join(RANK_ON)}")
    refresh, lag = config.refresh_every, config.solve_lag
    if refresh is not None and (not isinstance(refresh, int) or refresh < 1):
        raise ConfigError(f"refresh_every must be a positive integer, got {refresh!r}")
    if lag is not None and (not isinstance(lag, int) or lag < 0 or lag >= (refresh or DEFAULT_REFRESH["tracked"])):
        raise ConfigError(f"solve_lag must be an integer in [0, refresh_every), got {lag!r}")


def resolve_spectrum(spectrum: str, refresh_every, solve_lag, on_accelerator: bool) -> Tuple[str, int, int]:
    """(method, refresh_every, solve_lag) for RPG/TRP. ``"auto"`` is ``tracked`` on an
    accelerator (eigen-solvers are slow there, and every host read-back stalls the device) and
    ``gram`` on a CPU. Unset settings take the method's defaults: refresh every 50 calls
    (subspace) or 10 (tracked); a lag of 8 steps on an accelerator, 0 (solve in the call) on a CPU."""
    method = spectrum if spectrum != "auto" else ("tracked" if on_accelerator else "gram")
    refresh = int(refresh_every) if refresh_every is not None else DEFAULT_REFRESH.get(method, 50)
    if solve_lag is not None:
        lag = int(solve_lag)
    else:
        lag = min(ACCELERATOR_SOLVE_LAG, refresh - 1) if (method == "tracked" and on_accelerator) else 0
    if method == "tracked" and not 0 <= lag < refresh:
        raise ConfigError(f"solve_lag must be in [0, refresh_every) = [0, {refresh}), got {lag}")
    return method, refresh, lag


def host_solve(gram: np.ndarray, energy: np.ndarray, choose_rank) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """Eigen-decomposition of stacked Gram matrices on the host (float64 LAPACK): the basis
    (float32, columns in descending σ order), σ (float64) and each matrix's rank."""
    w, v = np.linalg.eigh(np.asarray(gram, np.float64))
    s = np.sqrt(np.clip(w[:, ::-1], 0.0, None))
    ranks = [int(choose_rank(si, float(ei))) for si, ei in zip(s, energy)]
    return np.ascontiguousarray(v[:, :, ::-1]).astype(np.float32), s, ranks


class BasisTracker:
    """Stacks matrices by shape, solves their bases every ``refresh_every`` calls, keeps ranks.

    The solve itself is the Gram matrix on the device, read back once, and its eigen-decomposition
    in float64 on the host — the same host computation for every backend, so identical weights
    give identical ranks everywhere. With ``lag = 0`` it happens inside the call that is due.
    With ``lag = L > 0`` (for accelerators) the due call only computes and reads back the Gram
    matrices and hands the eigen-decomposition to a background thread; its result is installed
    exactly ``L`` calls later (waiting for it if needed), so the outcome never depends on timing
    while the host work overlaps ``L`` training steps. The first solve of a group is always
    immediate.
    """

    def __init__(self, ops: Ops, refresh_every: int = 20, lag: int = 0):
        if int(refresh_every) < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {refresh_every!r}")
        if not (0 <= int(lag) < int(refresh_every)):
            raise ConfigError(f"lag must be in [0, refresh_every), got {lag!r}")
        self.ops = ops
        self.refresh_every = int(refresh_every)
        self.lag = int(lag)
        self.groups: Dict[Tuple, TrackedGroup] = {}
        self.calls = 0
        self.exact_solves = 0
        self._fresh = False
        self._queued = None  # (install at call, {key: (gram, energy)}, {key: future})
        self._executor = None

    def reset(self) -> None:
        """Solve exactly at the next call (e.g. after a mask update made the weights jump)."""
        self.groups.clear()
        self._queued = None

    @property
    def solved_now(self) -> bool:
        """Whether the last :meth:`stacks` call installed a solve (ranks and spectra are new)."""
        return self._fresh

    def stacks(self, mats: Dict[str, Tensor], choose_rank: Callable[[np.ndarray, float], int]
               ) -> List[Tuple[TrackedGroup, Tensor]]:
        """Stack the named matrices by shape (smaller side first); solve where due, choosing each
        layer's rank with ``choose_rank(singular_values, total_energy)``. Returns the groups with
        their stacks (B, a, b), a ≤ b."""
        ops = self.ops
        by_shape: Dict[Tuple, List[str]] = {}
        for name, m in mats.items():
            by_shape.setdefault(tuple(ops.shape(m)), []).append(name)
        call = self.calls
        due = call % self.refresh_every == 0
        self.calls += 1
        self._fresh = False
        if self._queued is not None and self._queued[0] == call:
            self._install_queued(choose_rank, like=next(iter(mats.values())))
        out, queue = [], {}
        for shape, names in by_shape.items():
            key = (shape, tuple(names))
            stack = ops.stack([mats[n] for n in names], axis=0)
            if shape[0] > shape[1]:
                stack = ops.swap_last(stack)
            group = self.groups.get(key)
            if group is None or (due and self.lag == 0):
                gram, energy = self._gram(stack)
                group = self._install(TrackedGroup(tuple(names), shape),
                                      host_solve(gram, energy, choose_rank), energy, like=stack)
                self.groups[key] = group
            elif due:
                queue[key] = self._gram(stack)
            out.append((group, stack))
        if queue:
            self._queue(call + self.lag, queue, choose_rank)
        return out

    # ------------------------------------------------------------------ solving
    def _gram(self, stack: Tensor) -> Tuple[np.ndarray, np.ndarray]:
        ops = self.ops
        gram = ops.to_numpy(ops.matmul(stack, ops.swap_last(stack)))
        energy = np.trace(np.asarray(gram, np.float64), axis1=1, axis2=2)  # ‖M‖_F² = tr(M Mᵀ)
        return gram, energy

    def _install(self, group: TrackedGroup, solved, energy: np.ndarray, like: Tensor) -> TrackedGroup:
        ops = self.ops
        basis, s, ranks = solved
        self.exact_solves += 1
        self._fresh = True
        group.host_basis = basis
        group.s, group.energy, group.ranks = s, np.asarray(energy, np.float64), list(ranks)
        # only the columns some matrix of the group uses travel, each matrix's beyond its rank zeroed:
        # a per-layer rank becomes a fixed-shape batched matmul, q/a of the full basis's cost
        q = max(1, max(ranks, default=0))
        mask = (np.arange(q)[None, :] < np.asarray(ranks)[:, None]).astype(np.float32)
        group.basis = ops.asarray(basis[:, :, :q] * mask[:, None, :], like=like)
        return group

    def _queue(self, install_at: int, grams: Dict, choose_rank) -> None:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prunekit-solve")
        futures = {key: self._executor.submit(host_solve, g, e, choose_rank) for key, (g, e) in grams.items()}
        self._queued = (install_at, grams, futures)

    def _install_queued(self, choose_rank, like: Tensor) -> None:
        _, grams, futures = self._queued
        self._queued = None
        for key, future in futures.items():
            group = self.groups.get(key)
            if group is not None:
                self._install(group, future.result(), grams[key][1], like=like)

    def unstack(self, group: TrackedGroup, x: Tensor) -> Dict[str, Tensor]:
        """Per-layer matrices of a stacked result, back in the caller's orientation."""
        ops = self.ops
        if group.transposed:
            x = ops.swap_last(x)
        return dict(zip(group.names, ops.unstack(x)))

    def coefficients(self, group: TrackedGroup, stack: Tensor) -> Tensor:
        """Uₖᵀ M per matrix, rows beyond each rank zeroed: (B, q, b)."""
        ops = self.ops
        return ops.matmul(ops.swap_last(group.basis), stack)

    def project(self, group: TrackedGroup, stack: Tensor) -> Tensor:
        """The rank-k projection U_k U_kᵀ M of every matrix in the stack."""
        return self.ops.matmul(group.basis, self.coefficients(group, stack))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Bases, spectra, ranks, the call counter and any queued solve's inputs, as NumPy."""
        queued = None
        if self._queued is not None:
            install_at, grams, _ = self._queued
            queued = {"install_at": install_at,
                      "grams": [{"shape": list(k[0]), "names": list(k[1]), "gram": g, "energy": e}
                                for k, (g, e) in grams.items()]}
        return {"calls": int(self.calls), "exact_solves": int(self.exact_solves), "queued": queued,
                "groups": [{"names": list(g.names), "shape": list(g.shape), "basis": g.host_basis,
                            "s": g.s, "energy": g.energy, "ranks": list(g.ranks)} for g in self.groups.values()]}

    def load_state_dict(self, state: dict, choose_rank, like: Tensor | None = None) -> None:
        self.calls = int(state.get("calls", 0))
        self.groups, self._queued = {}, None
        for d in state.get("groups", []):
            shape = tuple(int(v) for v in d["shape"])
            g = TrackedGroup(tuple(d["names"]), shape)
            self._install(g, (np.asarray(d["basis"], np.float32), np.asarray(d["s"], np.float64),
                              [int(r) for r in d["ranks"]]), d["energy"], like=like)
            self.groups[(shape, g.names)] = g
        self.exact_solves = int(state.get("exact_solves", 0))
        q = state.get("queued")
        if q:
            grams = {(tuple(int(v) for v in d["shape"]), tuple(d["names"])): (np.asarray(d["gram"]), np.asarray(d["energy"]))
                     for d in q["grams"]}
            self._queue(int(q["install_at"]), grams, choose_rank)


def bind_rank_machinery(algorithm, config) -> None:
    """Give an RPG/TRP algorithm its rank machinery from its config (``rank_on``, ``spectrum``,
    ``refresh_every``, ``solve_lag``): ``rank_ops``, the resolved ``spectrum``, the
    :class:`~prunekit.decisions.spectrum.SpectrumEngine` and, for ``tracked``, a :class:`BasisTracker`."""
    from prunekit.decisions.spectrum import SpectrumEngine, rank_ops

    algorithm.rank_ops = rank_ops(algorithm.ops, config.rank_on)
    on_accelerator = algorithm.ops.on_accelerator(algorithm.handle.weight(algorithm.layers[0].name))
    algorithm.spectrum, refresh, lag = resolve_spectrum(config.spectrum, config.refresh_every, config.solve_lag,
                                                        on_accelerator)
    algorithm.engine = SpectrumEngine(algorithm.rank_ops, algorithm.spectrum, refresh)
    algorithm.tracker = BasisTracker(algorithm.rank_ops, refresh, lag) if algorithm.spectrum == "tracked" else None


def save_rank_machinery(algorithm, state: dict) -> dict:
    """Add an RPG/TRP algorithm's spectrum engine and basis tracker state to ``state``."""
    state["engine"] = algorithm.engine.state_dict()
    if algorithm.tracker is not None:
        state["tracker"] = algorithm.tracker.state_dict()
    return state


def load_rank_machinery(algorithm, state: dict) -> None:
    """Restore :func:`save_rank_machinery`'s entries (device tensors beside the first layer's
    weight when the rank work runs on the device); ranks are re-chosen by ``algorithm.rank_rule``."""
    like = algorithm.handle.weight(algorithm.layers[0].name) if algorithm.rank_ops is algorithm.ops else None
    if "engine" in state:
        algorithm.engine.load_state_dict(state["engine"], like=like)
    if algorithm.tracker is not None and "tracker" in state:
        algorithm.tracker.load_state_dict(state["tracker"], algorithm.rank_rule, like=like)


def batch_scalars(ops: Ops, x: Tensor) -> Tensor:
    """Σ x² over each matrix of a stack, shaped (B, 1, 1) for broadcasting."""
    return ops.sum(x * x, axis=(1, 2), keepdims=True)


def positive(ops: Ops, x: Tensor) -> Tensor:
    """1.0 where x > 0 else 0.0 (same shape)."""
    return ops.cast(ops.greater(x, ops.zeros_like(x)), "float32")
