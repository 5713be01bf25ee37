"""The PyTorch backend as the core sees it: :class:`TorchBackend`, the
:class:`prunekit.contract.backend.Backend` of this package (``prunekit.backends.torch.BACKEND``).

The members that call this package's files are :class:`prunekit.backends.common.DelegatingBackend`'s;
this file holds what is PyTorch's own: the classes, moving a reference model to its device, and
how ``torchrun`` shows in the environment.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from ..common import DelegatingBackend
from .driver import PruningSession, Trainer
from .layers import TorchModelHandle
from .ops import TorchOps


class TorchBackend(DelegatingBackend):
    name = "torch"
    package = __package__
    handle_class = TorchModelHandle
    Ops = TorchOps
    Trainer = Trainer
    PruningSession = PruningSession

    def _build_model(self, name, num_classes, in_channels, width, device):
        model = super()._build_model(name, num_classes, in_channels, width, device)
        if device:
            model.to(device)
        return model

    def owns_model(self, model) -> bool:
        import torch
        return isinstance(model, torch.nn.Module)

    # ------------------------------------------------------------------ data parallel (torchrun)
    def launched(self, env: Optional[Mapping[str, str]] = None) -> bool:
        env = os.environ if env is None else env
        return "WORLD_SIZE" in env and "RANK" in env

    def launcher_world_size(self, env: Optional[Mapping[str, str]] = None) -> int:
        env = os.environ if env is None else env
        return int(env["WORLD_SIZE"]) if self.launched(env) else 1
