"""The MindSpore backend as the core sees it: :class:`MindSporeBackend`, the
:class:`prunekit.contract.backend.Backend` of this package (``prunekit.backends.mindspore.BACKEND``).

The members that call this package's files are :class:`prunekit.backends.common.DelegatingBackend`'s;
this file holds what is MindSpore's own: the classes, the check that a reference model's device
is the process's, and how ``msrun`` shows in the environment.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from ..common import DelegatingBackend
from .driver import PruningSession, Trainer
from .layers import MindSporeModelHandle
from .ops import MindSporeOps, check_device

#: values of ``MS_ROLE`` in the processes msrun starts. msrun also runs the script in its
#: scheduler process (MS_SCHED), whose ``init()`` serves the cluster and never returns: it must
#: take the same path as the workers.
MS_ROLES = ("MS_WORKER", "MS_SCHED")


class MindSporeBackend(DelegatingBackend):
    name = "mindspore"
    package = __package__
    handle_class = MindSporeModelHandle
    Ops = MindSporeOps
    Trainer = Trainer
    PruningSession = PruningSession

    def _build_model(self, name, num_classes, in_channels, width, device):
        """``device`` must be the process's MindSpore device (see :func:`check_device`), or None."""
        check_device(device)
        return super()._build_model(name, num_classes, in_channels, width, device)

    def owns_model(self, model) -> bool:
        import mindspore
        return isinstance(model, mindspore.nn.Cell)

    # ------------------------------------------------------------------ data parallel (msrun)
    def launched(self, env: Optional[Mapping[str, str]] = None) -> bool:
        env = os.environ if env is None else env
        return env.get("MS_ROLE") in MS_ROLES

    def launcher_world_size(self, env: Optional[Mapping[str, str]] = None) -> int:
        env = os.environ if env is None else env
        return int(env["MS_WORKER_NUM"]) if self.launched(env) and "MS_WORKER_NUM" in env else 1
