"""Data-parallel pruning for PyTorch: DistributedDataParallel under ``torchrun``.

    torchrun --nproc_per_node=2 -m prunekit run --backend torch --distributed ...

or in your own script, after ``init_distributed()`` (gloo on CPU, NCCL when ``device`` is CUDA;
each process then uses ``cuda:<LOCAL_RANK>``)::

    comm = init_distributed(device)
    trainer = DistributedTrainer(handle, algorithm, "sgd", lr, total_steps=steps)
    for x, y in global_batches:          # the same global batch on every rank
        trainer.train_step(x, y)         # each rank trains on its contiguous share

DDP averages the gradients during the backward pass, so the algorithm's hooks (RigL's dense
gradients in ``observe_gradients`` included) see the gradient of the global batch, and every
rank takes the same optimizer step: the run matches a single process over the same global
batches up to the order of the float reductions, which training amplifies (docs/DECISIONS.md,
"Data-parallel training": bounds). :class:`DistributedSession` adds the
:class:`~prunekit.app.distributed.ConsistencyGuard` (masks broadcast from rank 0 on every change
and compared; a final check of decisions and weights). BatchNorm uses each rank's own batch
statistics (as DDP does without SyncBatchNorm, which PyTorch supports on GPUs only); the
running statistics are averaged over ranks at ``finish`` and before evaluating.
"""
from __future__ import annotations

import inspect
import os
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from prunekit.app.distributed import (Communicator, average_running_stats, CountingBatches, combine_evaluation,
                                      set_world, shard, shard_batches, world)
from prunekit.app.session import DataParallelSession
from prunekit.errors import ConfigError

from .driver import PruningSession, Trainer

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


class TorchCommunicator(Communicator):
    """Collectives of the default process group over NumPy arrays (on the group's device)."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device = device

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, copy=True)).to(self.device)

    def broadcast(self, array, root=0):
        t = self._tensor(array)
        dist.broadcast(t, root)
        return t.cpu().numpy()

    def allreduce_sum(self, array):
        t = self._tensor(array)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def model_device(self, requested):
        return str(self.device) if self.device.type != "cpu" else requested


def init_distributed(device: Optional[str] = None) -> TorchCommunicator:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on CUDA) and make it
    :func:`prunekit.app.distributed.world`."""
    dev = torch.device(device) if device else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ConfigError("init_distributed needs torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, "
                              "MASTER_PORT): start with `torchrun --nproc_per_node=N ...`")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    comm = TorchCommunicator(dev)
    set_world(comm)
    return comm


class DistributedSession(DataParallelSession, PruningSession):
    """A :class:`PruningSession` for data-parallel runs (:class:`~prunekit.app.session.DataParallelSession`):
    the gradients it is given are already averaged (DDP)."""


class DistributedTrainer(Trainer):
    """:class:`Trainer` on DDP: ``train_step`` takes the global batch and trains on this rank's
    share; ``evaluate`` scores every ``size``-th batch here and combines the ranks' figures."""

    session_class = DistributedSession

    def __init__(self, handle, algorithm=None, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, total_steps: int = 1, lr_schedule: str = "cosine",
                 milestones: tuple = (), device: Optional[str] = None):
        self.comm = world()
        if self.comm.size == 1 and not dist.is_initialized():
            raise ConfigError("DistributedTrainer needs init_distributed() first (under torchrun)")
        super().__init__(handle, algorithm, optimizer, lr, momentum, weight_decay, total_steps, lr_schedule,
                         milestones, device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # rank 0's buffers are not re-broadcast every forward: BN statistics are averaged at the end
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                   else {"broadcast_buffers": False})
        self.model = DistributedDataParallel(handle.model, device_ids=ids, **no_sync)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """One step on this rank's share of the global batch ``x, y``; returns the global batch's
        mean loss, and ``last_correct`` counts the whole global batch (one small all-reduce, on
        the device: no host synchronisation)."""
        loss = super().train_step(*shard(x, y, self.comm.rank, self.comm.size))
        correct = getattr(self, "last_correct", None)
        both = torch.stack([loss.float(), (correct if correct is not None else torch.zeros_like(loss)).float()])
        dist.all_reduce(both)
        if correct is not None:
            self.last_correct = both[1]
        return both[0] / self.comm.size

    def evaluate(self, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float]:
        average_running_stats(self.comm, self.handle)
        counted = CountingBatches(shard_batches(batches, self.comm.rank, self.comm.size))
        ddp, self.model = self.model, self.handle.model
        try:
            loss, acc = super().evaluate(counted)
        finally:
            self.model = ddp
        return tuple(combine_evaluation(self.comm, loss, acc, counted.count))

