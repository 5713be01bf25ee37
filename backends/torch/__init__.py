"""The PyTorch backend (CPU and CUDA)."""
from .driver import PruningSession, Trainer, make_optimizer
from . import checkpoint
from .layers import TorchModelHandle, discover_layers
from .compact import compact
from .timing import time_inference
from .models import build_model
from .surgery import apply_decompositions
from .ops import TorchOps

NAME = "torch"
Ops = TorchOps


def model_handle(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, seed: int = 0,
                 device: str | None = None, width: int = 1) -> TorchModelHandle:
    """Build a reference model with the shared seeded initialisation and wrap it in a handle."""
    model = build_model(name, num_classes, in_channels, width)
    if device:
        model.to(device)
    handle = TorchModelHandle(model, (in_channels, image_size, image_size), name)
    handle.initialize(seed)
    return handle
