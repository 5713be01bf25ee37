"""Data-parallel training, the framework-neutral part (no framework imports here).

Each backend provides, through its :class:`prunekit.contract.backend.Backend`, a launcher
(``torchrun`` for PyTorch's DDP on gloo or NCCL, ``msrun`` for MindSpore's
``DistributedGradReducer``), ``init_distributed`` returning a :class:`Communicator` over NumPy
arrays, and a ``DistributedTrainer``. What is here:

* :func:`world` -- the process's communicator (a single-process one when not distributed), so
  an algorithm that computes a decision from per-rank data (activations, batch statistics) can
  average it with ``world().allreduce_mean(array)`` and stay correct under data parallelism;
* :func:`start_distributed` -- what ``prunekit run`` calls: detects the backend's launcher;
* :func:`shard` -- the rank's contiguous slice of a global batch;
* :class:`ConsistencyGuard` -- the safety net that every algorithm gets for free. Gradients are
  averaged before any algorithm hook sees them, and weights are updated identically on every
  rank, so decisions computed from weights and gradients are identical already. The guard
  checks it: whenever the masks change on any rank it broadcasts rank 0's masks, counts the
  entries that differ, and (``on_mismatch="adopt"``, the default) makes every rank use rank 0's
  masks or (``"raise"``) stops. At the end, :meth:`ConsistencyGuard.check_final` compares a
  digest of the algorithm's state (masks, ranks, sparsity: its ``state_dict()``), its
  ``ranks``, its ``channel_keep`` and the model's weights across ranks and raises
  :class:`DistributedMismatch` naming what differs.
"""
from __future__ import annotations

import hashlib
import logging
from typing import List, Optional

import numpy as np

from prunekit.errors import ConfigError, PrunekitError

log = logging.getLogger(__name__)

ON_MISMATCH = ("adopt", "raise")
#: BN statistics (state_numpy names) that are per-rank during training and averaged at the end
RUNNING_STATS = (".running_mean", ".running_var")


class DistributedMismatch(PrunekitError):
    """Ranks of a data-parallel run hold different decisions, weights or state."""


class Communicator:
    """Collectives over NumPy arrays. This base class is the single-process world (size 1)."""

    rank = 0
    size = 1
    local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """``root``'s array, on every rank (same shape and dtype everywhere)."""
        return np.array(array, copy=True)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum over ranks, on every rank."""
        return np.array(array, copy=True)

    def allreduce_mean(self, array: np.ndarray) -> np.ndarray:
        return self.allreduce_sum(array) / float(self.size)

    def model_device(self, requested: Optional[str]) -> Optional[str]:
        """The device this rank's model goes on (e.g. ``cuda`` becomes ``cuda:<local rank>``)."""
        return requested


_WORLD: Communicator = Communicator()


def world() -> Communicator:
    """The process's communicator; size 1 unless a backend's ``init_distributed`` ran."""
    return _WORLD


def set_world(comm: Communicator) -> None:
    global _WORLD
    _WORLD = comm


def start_distributed(backend, requested: Optional[bool] = None, device: Optional[str] = None) -> Optional[Communicator]:
    """Join the launcher's process group of ``backend`` (a :class:`~prunekit.contract.backend.Backend`)
    when asked (``requested=True``) or, with None, when its launcher started this process with
    more than one worker. Returns None for a single process."""
    n = backend.launcher_world_size()
    if requested is None:
        requested = n > 1
    if not requested:
        return None
    if n < 1 or not backend.launched():
        raise ConfigError(f"distributed training on {backend.name} needs its launcher: {backend.launcher}")
    return backend.init_distributed(device)


class _ParallelBackend:
    """A backend whose ``Trainer`` is its ``DistributedTrainer`` (everything else as is)."""

    def __init__(self, backend, trainer):
        self._backend = backend
        self.Trainer = trainer

    def __getattr__(self, name):
        return getattr(self._backend, name)


def parallel_backend(backend, comm: Optional[Communicator]):
    """``backend`` itself for a single process; with a started group, the backend with its
    ``DistributedTrainer`` as ``Trainer`` (so code that builds ``backend.Trainer`` needs no change)."""
    return backend if comm is None else _ParallelBackend(backend, trainer_class(backend, comm))


def trainer_class(backend, comm: Optional[Communicator]):
    """The backend's ``Trainer``, or its ``DistributedTrainer`` when ``comm`` is a started group."""
    return backend.Trainer if comm is None else backend.DistributedTrainer


def shard(x: np.ndarray, y: np.ndarray, rank: int, size: int):
    """Rank ``rank``'s contiguous share of a global batch (the batch must divide evenly, so that
    the mean of the ranks' mean losses is the global batch's mean loss)."""
    n = int(np.shape(y)[0])
    if n % size:
        raise ConfigError(f"global batch of {n} does not split evenly over {size} ranks; "
                          f"use a batch size divisible by {size}")
    per = n // size
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def check_batch_size(batch_size: int, size: int) -> None:
    if size > 1 and batch_size % size:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over {size} ranks; "
                          f"use a multiple of {size}")


# ---------------------------------------------------------------------------- digests
def _feed(h, value) -> None:
    if isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            h.update(b":")
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
        h.update(repr(value).encode())
    else:  # a framework tensor
        _feed(h, np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value.detach().cpu().numpy()))


def digest_words(value) -> np.ndarray:
    """SHA-256 of a (nested) value as 16 float32 numbers (16-bit words, exact in float32)."""
    h = hashlib.sha256()
    _feed(h, value)
    return np.frombuffer(h.digest(), dtype=np.uint16).astype(np.float32)


# ---------------------------------------------------------------------------- model state
def broadcast_state(comm: Communicator, handle) -> None:
    """Every rank takes rank 0's parameters and BN statistics (one broadcast)."""
    if comm.size == 1:
        return
    state = handle.state_numpy()
    names = sorted(state)
    _same_everywhere(comm, [(n, state[n].shape) for n in names], "model parameter names and shapes")
    flat = np.concatenate([state[n].astype(np.float32).ravel() for n in names]) if names else np.zeros(0, np.float32)
    root = comm.broadcast(flat)
    out, at = {}, 0
    for n in names:
        size = state[n].size
        out[n] = root[at:at + size].reshape(state[n].shape).astype(state[n].dtype)
        at += size
    handle.load_state_numpy(out)


def average_running_stats(comm: Communicator, handle) -> None:
    """BN running mean/variance averaged over ranks (each rank's track its own shards)."""
    if comm.size == 1:
        return
    state = handle.state_numpy()
    names = sorted(n for n in state if n.endswith(RUNNING_STATS))
    if not names:
        return
    flat = np.concatenate([state[n].astype(np.float32).ravel() for n in names])
    mean = comm.allreduce_mean(flat)
    out, at = {}, 0
    for n in names:
        out[n] = mean[at:at + state[n].size].reshape(state[n].shape).astype(state[n].dtype)
        at += state[n].size
    handle.load_state_numpy(out, strict=False)


def _same_everywhere(comm: Communicator, value, what: str) -> None:
    words = digest_words(value)
    differs = float(np.any(comm.broadcast(words) != words))
    if comm.allreduce_sum(np.array([differs], np.float32))[0] > 0:
        raise DistributedMismatch(f"ranks disagree on {what}")


# ---------------------------------------------------------------------------- the guard
class ConsistencyGuard:
    """Keeps an algorithm's masks identical on every rank and checks its decisions at the end.

    Call :meth:`check` once a step after the algorithm's ``before_step`` (it sees mask changes
    made in the previous ``after_step`` too, before they are used) and after ``finish``; it
    costs one tiny all-reduce a step, plus a broadcast of the masks when they changed.
    """

    def __init__(self, comm: Communicator, algorithm=None, on_mismatch: str = "adopt"):
        if on_mismatch not in ON_MISMATCH:
            raise ConfigError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
        self.comm = comm
        self.algorithm = algorithm
        self.on_mismatch = on_mismatch
        self._seen = None
        self.mask_syncs = 0            # broadcasts of the masks so far
        self.mismatched_entries = 0    # mask entries that differed from rank 0's (summed over ranks)

    def _signature(self):
        masks = self.algorithm.masks
        return (id(masks),) + tuple((n, id(m)) for n, m in masks.items())

    def check(self) -> bool:
        """If the masks changed on any rank, make every rank hold rank 0's. True if it replaced
        (adopted) masks on this rank, so that the caller re-masks the optimizer state."""
        if self.algorithm is None or self.comm.size == 1:
            return False
        sig = self._signature()
        changed = float(sig != self._seen)
        if self.comm.allreduce_sum(np.array([changed], np.float32))[0] == 0:
            return False
        self._seen = sig
        return self._sync_masks()

    def _sync_masks(self) -> bool:
        alg, ops = self.algorithm, self.algorithm.ops
        names = sorted(alg.masks)
        local = {n: ops.to_numpy(alg.masks[n]) for n in names}
        _same_everywhere(self.comm, [(n, local[n].shape) for n in names], f"{alg.name} mask layers and shapes")
        if not names:  # no masks anywhere (the layer check above is collective)
            return False
        self.mask_syncs += 1
        flat = np.concatenate([local[n].astype(np.float32).ravel() for n in names])
        root = self.comm.broadcast(flat)
        diff = float(np.count_nonzero(root != flat))
        total = int(self.comm.allreduce_sum(np.array([diff], np.float32))[0])
        if total == 0:
            return False
        self.mismatched_entries += total
        msg = (f"{alg.name}: the masks differ between ranks in {total} entries (an algorithm decision made "
               "from per-rank data that was not synchronised)")
        if self.on_mismatch == "raise":
            raise DistributedMismatch(msg)
        if self.comm.is_main:
            log.warning("%s; every rank now uses rank 0's masks", msg)
        if diff == 0:  # this rank already held rank 0's masks
            return False
        adopted, at = {}, 0
        for n in names:
            size = local[n].size
            adopted[n] = ops.asarray(root[at:at + size].reshape(local[n].shape).astype(np.float32),
                                     like=alg.masks[n])
            at += size
        alg.masks = adopted
        alg.apply_masks()
        alg.masks_changed = True
        self._seen = self._signature()
        return True

    def check_final(self, handle) -> None:
        """Raise :class:`DistributedMismatch` unless every rank holds the same algorithm state,
        ranks, kept channels and weights (compared by digest)."""
        if self.comm.size == 1:
            return
        alg = self.algorithm
        parts = {
            "algorithm state": alg.state_dict() if alg is not None else None,
            "ranks": getattr(alg, "ranks", None),
            "kept channels": getattr(alg, "channel_keep", None),
            "weights": handle.state_numpy(),
        }
        words = np.stack([digest_words(v) for v in parts.values()])
        differs = np.any(self.comm.broadcast(words) != words, axis=1).astype(np.float32)
        counts = self.comm.allreduce_sum(differs)
        bad = [name for name, c in zip(parts, counts) if c > 0]
        if bad:
            raise DistributedMismatch(f"after training, ranks hold different {', '.join(bad)}")


def shard_batches(batches, rank: int, size: int):
    """Every ``size``-th batch starting at ``rank`` (evaluation: each rank scores its share)."""
    for i, b in enumerate(batches):
        if i % size == rank:
            yield b


def combine_evaluation(comm: Communicator, mean_loss: float, accuracy: float, count: int) -> List[float]:
    """(mean loss, accuracy) over all ranks' shares from each rank's own figures and count."""
    total = comm.allreduce_sum(np.array([mean_loss * count, accuracy * count, count], np.float64))
    n = max(1.0, float(total[2]))
    return [float(total[0]) / n, round(float(total[1])) / n]


class CountingBatches:
    """Iterates batches and counts their examples (``count``)."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __iter__(self):
        for x, y in self.batches:
            self.count += int(np.shape(y)[0])
            yield x, y
