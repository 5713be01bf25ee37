"""Process-wide settings of the PyTorch backend: :func:`configure_process`, which the package
calls once on import.

It changes nothing, on purpose. PyTorch needs no process-wide choice before its first
computation: the device is chosen per model (``model_handle(..., device=...)`` moves the model
there), the rank machinery runs on the framework's own tensors (no host NumPy BLAS competing for
the cores, unlike the MindSpore backend's), and oneDNN's default convolution is fast for
PyTorch's CPU tensors. Thread counts are left to the user; ``make_deterministic`` sets them for
reproducible runs. The function exists so that both backends have the same one named place for
such settings.
"""
from __future__ import annotations


def configure_process() -> None:
    """Nothing to configure for PyTorch (see the module doc)."""


def check_device(device) -> None:
    """Refuse a ``device`` string PyTorch cannot parse, or a CUDA/MPS device this machine lacks."""
    if not device:
        return
    import torch

    from prunekit.errors import ConfigError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {device!r} is not a PyTorch device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: no CUDA GPU is available to PyTorch here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported; expected cpu, cuda, cuda:N or mps")
