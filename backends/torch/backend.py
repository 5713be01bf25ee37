"""The PyTorch backend as the core sees it: :class:`TorchBackend`, the
:class:`prunekit.contract.backend.Backend` of this package (``prunekit.backends.torch.BACKEND``).

Each member delegates to the file that does the work; the data-parallel, export, channel-probe
and gate files are imported when first used.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from prunekit.contract.backend import Backend

from . import checkpoint, runtime, timing
from .compact import compact
from .driver import PruningSession, Trainer
from .layers import TorchModelHandle
from .models import build_model
from .ops import TorchOps
from .surgery import apply_decompositions


class TorchBackend(Backend):
    name = "torch"
    Ops = TorchOps
    Trainer = Trainer
    PruningSession = PruningSession

    def configure_process(self) -> None:
        runtime.configure_process()

    # ------------------------------------------------------------------ models
    def model_handle(self, name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     seed: int = 0, device: Optional[str] = None, width: int = 1) -> TorchModelHandle:
        model = build_model(name, num_classes, in_channels, width)
        if device:
            model.to(device)
        handle = TorchModelHandle(model, (in_channels, image_size, image_size), name)
        handle.initialize(seed)
        return handle

    def wrap(self, model, input_shape: Sequence[int], model_name: str = "model") -> TorchModelHandle:
        return TorchModelHandle(model, input_shape, model_name)

    # ------------------------------------------------------------------ channels
    def norm_layers(self, handle):
        from .channels import norm_layers
        return norm_layers(handle)

    def probe_channels(self, handle, perturb, rows: int):
        from .channels import probe_channels
        return probe_channels(handle, perturb, rows)

    def compact(self, handle, keep):
        return compact(handle, keep)

    def apply_decompositions(self, handle, decompositions):
        return apply_decompositions(handle, decompositions)

    def channel_gates(self, handle, groups):
        from .gates import ChannelGates
        return ChannelGates(handle, groups)

    # ------------------------------------------------------------------ checkpoints
    def capture_training_state(self, trainer) -> dict:
        return checkpoint.capture_training_state(trainer)

    def restore_training_state(self, trainer, state: dict) -> None:
        checkpoint.restore_training_state(trainer, state)

    def rng_state(self) -> dict:
        return checkpoint.rng_state()

    def set_rng_state(self, state: dict) -> None:
        checkpoint.set_rng_state(state)

    def make_deterministic(self, threads: int = 1) -> None:
        checkpoint.make_deterministic(threads)

    # ------------------------------------------------------------------ data parallel (torchrun)
    def launched(self, env: Optional[Mapping[str, str]] = None) -> bool:
        env = os.environ if env is None else env
        return "WORLD_SIZE" in env and "RANK" in env

    def launcher_world_size(self, env: Optional[Mapping[str, str]] = None) -> int:
        env = os.environ if env is None else env
        return int(env["WORLD_SIZE"]) if self.launched(env) else 1

    def init_distributed(self, device: Optional[str] = None):
        from .distributed import init_distributed
        return init_distributed(device)

    @property
    def DistributedTrainer(self) -> type:
        from .distributed import DistributedTrainer
        return DistributedTrainer

    # ------------------------------------------------------------------ export, timing
    def export(self, fmt, structure, state, out, x, reference, tolerance) -> dict:
        from .export import export
        return export(fmt, structure, state, out, x, reference, tolerance)

    def time_inference(self, handles, batch, warmup=2, repeats=5, deploy=None, rounds=1):
        deploy_arg = {} if deploy is None else {"deploy": deploy}
        return timing.time_inference(handles, batch, warmup, repeats, rounds=rounds, **deploy_arg)
