"""Data-parallel pruning for MindSpore: data parallel under ``msrun`` (CPU, GPU or Ascend).

    PATH=VENV/bin:$PATH msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \\
        VENV/bin/prunekit run --backend mindspore ...    # the console script (msrun has no -m)

(VENV: the environment prunekit is installed in. msrun starts every worker as ``python <script>``
with the ``python`` first on PATH, not with its own interpreter.)

or in your own script, after :func:`init_distributed` (``mindspore.communication.init()`` and
``set_auto_parallel_context(parallel_mode=DATA_PARALLEL, gradients_mean=True)``)::

    comm = init_distributed()
    trainer = DistributedTrainer(handle, algorithm, "sgd", lr, total_steps=steps)
    for x, y in global_batches:          # the same global batch on every rank
        trainer.train_step(x, y)         # each rank trains on its contiguous share

In PyNative mode nothing averages gradients by itself: :class:`DistributedSession` passes them
through ``nn.DistributedGradReducer`` (an all-reduce, mean over ranks) first thing in
``transform_gradients``, before the algorithm's hooks, so RigL's dense gradients in
``observe_gradients`` are the global batch's. Every rank then takes the same optimizer step and
the run matches a single process over the same global batches up to the order of the float
reductions, which training amplifies (docs/DECISIONS.md, "Data-parallel training": bounds). The :class:`~prunekit.app.distributed.ConsistencyGuard` broadcasts rank 0's masks on
every change and checks decisions and weights at ``finish``. BatchNorm uses each rank's own
batch statistics; the running statistics are averaged over ranks at ``finish`` and before
evaluating.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.app.distributed import (Communicator, CountingBatches, average_running_stats,
                                      combine_evaluation, set_world, shard, shard_batches, world)
from prunekit.app.session import DataParallelSession
from prunekit.errors import ConfigError

from .backend import MS_ROLES
from .driver import PruningSession, Trainer

_initialised = False


class MindSporeCommunicator(Communicator):
    """Collectives of MindSpore's world group over NumPy arrays (sent as float32)."""

    def __init__(self):
        from mindspore.communication import get_group_size, get_local_rank, get_rank

        self.rank = int(get_rank())
        self.size = int(get_group_size())
        try:
            self.local_rank = int(get_local_rank())
        except RuntimeError:
            self.local_rank = self.rank
        self._allreduce = msops.AllReduce()
        self._broadcasts = {}

    def broadcast(self, array, root=0):
        a = np.asarray(array)
        if a.size == 0:  # MindSpore's CPU broadcast fails on an empty buffer
            return a.copy()
        op = self._broadcasts.setdefault(root, msops.Broadcast(root))
        out = op((ms.Tensor(np.ascontiguousarray(a, dtype=np.float32)),))[0].asnumpy()
        return out.astype(a.dtype, copy=False)

    def allreduce_sum(self, array):
        a = np.asarray(array)
        out = self._allreduce(ms.Tensor(np.ascontiguousarray(a, dtype=np.float32))).asnumpy()
        return out.astype(a.dtype if a.dtype.kind == "f" else np.float32, copy=False)


def init_distributed(device: Optional[str] = None) -> MindSporeCommunicator:
    """``mindspore.communication.init()`` under ``msrun``, data-parallel context (gradient mean),
    and make the communicator :func:`prunekit.app.distributed.world`."""
    global _initialised
    from .ops import check_device

    check_device(device)
    if not _initialised:
        if os.environ.get("MS_ROLE") not in MS_ROLES:
            raise ConfigError("init_distributed needs msrun's environment: start with "
                              "`msrun --worker_num=N --local_worker_num=N --join=True script.py`")
        from mindspore.communication import init

        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        _initialised = True
    comm = MindSporeCommunicator()
    set_world(comm)
    return comm


class DistributedSession(DataParallelSession, PruningSession):
    """A :class:`PruningSession` for data-parallel runs (:class:`~prunekit.app.session.DataParallelSession`)
    that averages the gradients over ranks before the algorithm sees them."""

    def __init__(self, handle, algorithm, optimizer, total_steps: int, on_mismatch: str = "adopt"):
        super().__init__(handle, algorithm, optimizer, total_steps, on_mismatch)
        self.reducer = (nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=self.comm.size)
                        if self.comm.size > 1 else None)
        #: average in transform_gradients (a custom loop); the Trainer averages right after backward
        self.reduce_gradients = self.reducer is not None

    def transform_gradients(self, grads):
        if self.reduce_gradients:
            grads = self.reducer(tuple(grads))
        return super().transform_gradients(grads)


class DistributedTrainer(Trainer):
    """:class:`Trainer` for data parallel: ``train_step`` takes the global batch and trains on this
    rank's share; ``evaluate`` scores every ``size``-th batch here and combines the ranks' figures."""

    session_class = DistributedSession

    def __init__(self, *args, **kwargs):
        self.comm = world()
        if not _initialised:
            raise ConfigError("DistributedTrainer needs init_distributed() first (under msrun)")
        super().__init__(*args, **kwargs)
        session = self.session
        if session.reducer is not None:
            # averaged as they come out of the backward pass, so that every path of the step (the
            # session's hooks, the Trainer's fused update) gets the global batch's gradients
            session.reduce_gradients = False
            local_grad, reducer = self._grad, session.reducer

            def averaged(x, y):
                value, grads = local_grad(x, y)
                return value, reducer(grads)

            self._grad = averaged
        self._sum = msops.AllReduce()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> ms.Tensor:
        """One step on this rank's share of the global batch ``x, y``; returns the global batch's
        mean loss, and ``last_correct`` counts the whole global batch (one small all-reduce)."""
        loss = super().train_step(*shard(x, y, self.comm.rank, self.comm.size))
        correct = getattr(self, "last_correct", None)
        if correct is None:
            return self._sum(loss) / self.comm.size
        both = self._sum(msops.stack([msops.cast(loss, ms.float32), msops.cast(correct, ms.float32)]))
        self.last_correct = both[1]
        return both[0] / self.comm.size

    def evaluate(self, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float]:
        average_running_stats(self.comm, self.handle)
        counted = CountingBatches(shard_batches(batches, self.comm.rank, self.comm.size))
        loss, acc = super().evaluate(counted)
        return tuple(combine_evaluation(self.comm, loss, acc, counted.count))
