"""Backend registry: find a framework adapter by name without importing the framework here.

``get_backend("torch")`` imports ``prunekit.backends.torch`` (and so PyTorch) only when asked. A backend
module exposes ``NAME``, an ``Ops`` class, ``model_handle(...)``, ``Trainer`` and
``PruningSession``; see ``backends/__init__.py`` for the file layout.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from prunekit.errors import BackendUnavailable, ConfigError

BACKENDS = {"torch": "prunekit.backends.torch", "mindspore": "prunekit.backends.mindspore"}
ALIASES = {"pytorch": "torch", "ms": "mindspore"}
_FRAMEWORK_MODULE = {"torch": "torch", "mindspore": "mindspore"}


def check_backend_name(name: str) -> str:
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return key


def get_backend(name: str) -> ModuleType:
    key = check_backend_name(name)
    try:
        importlib.import_module(_FRAMEWORK_MODULE[key])
    except ImportError as e:
        raise BackendUnavailable(f"backend {key!r} needs the {_FRAMEWORK_MODULE[key]} package, which failed to import: {e}") from None
    return importlib.import_module(BACKENDS[key])


def available_backends() -> list:
    out = []
    for key in BACKENDS:
        try:
            get_backend(key)
            out.append(key)
        except BackendUnavailable:
            pass
    return out
