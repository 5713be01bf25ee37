"""Shared test setup: the repository root on ``sys.path`` and a per-backend ``Ops`` fixture.

``neutral_ops`` runs a test once per backend listed in :data:`prunekit.backend.BACKENDS` and
skips the backends whose framework or adapter cannot be loaded here, so tests written only
against :class:`prunekit.ops.Ops` cover every backend that works in this environment.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from prunekit.backend import BACKENDS, get_backend  # noqa: E402
from prunekit.ops import Ops  # noqa: E402

_OPS_CACHE = {}


def load_ops(name: str) -> Ops:
    """An ``Ops`` instance of backend ``name``, or ``pytest.skip`` if it cannot be had."""
    if name not in _OPS_CACHE:
        try:
            module = get_backend(name)
            cls = getattr(module, "Ops", None)
            if cls is None or cls is Ops:  # fall back to the adapter's ops module
                import importlib
                ops_module = importlib.import_module(module.__name__ + ".ops")
                cls = next((v for v in vars(ops_module).values()
                            if isinstance(v, type) and issubclass(v, Ops) and v is not Ops), None)
            _OPS_CACHE[name] = cls() if cls is not None else f"backend {name!r} defines no Ops class"
        except Exception as e:  # framework missing, adapter absent or half-written
            _OPS_CACHE[name] = f"backend {name!r} unavailable: {type(e).__name__}: {e}"
    value = _OPS_CACHE[name]
    if isinstance(value, str):
        pytest.skip(value)
    return value


@pytest.fixture(params=sorted(BACKENDS))
def neutral_ops(request) -> Ops:
    return load_ops(request.param)
