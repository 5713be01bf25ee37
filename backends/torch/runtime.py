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
