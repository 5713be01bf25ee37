"""Shared test setup: the repository root on ``sys.path`` and a per-backend ``Ops`` fixture.

The tests are grouped like the package: ``contract/``, ``decisions/``, ``algorithms/``, ``app/``
(one folder per neutral layer), ``backends/`` (the adapters: the behaviour every backend must
show, written once in ``backends/test_backend_behaviour.py`` and run per backend, and what only
one framework has) and ``conformance/``. Test file names are unique across the folders (pytest's
default import mode; there are no ``__init__.py`` files).

``neutral_ops`` runs a test once per registered backend (:func:`prunekit.contract.backend.backend_names`) and
skips the backends whose framework or adapter cannot be loaded here, so tests written only
against :class:`prunekit.contract.ops.Ops` cover every backend that works in this environment.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from prunekit.contract.backend import backend_names, get_backend  # noqa: E402
from prunekit.contract.ops import Ops  # noqa: E402

_OPS_CACHE = {}
#: in CI (or with PRUNEKIT_REQUIRE_BACKENDS=1) a backend that cannot load fails its tests
REQUIRE_ALL_BACKENDS = bool(os.environ.get("PRUNEKIT_REQUIRE_BACKENDS") or os.environ.get("CI"))


def load_ops(name: str) -> Ops:
    """An ``Ops`` instance of backend ``name``, or ``pytest.skip`` if it cannot be had."""
    if name not in _OPS_CACHE:
        try:
            _OPS_CACHE[name] = get_backend(name).Ops()
        except Exception as e:  # framework missing, adapter absent or half-written
            _OPS_CACHE[name] = f"backend {name!r} unavailable: {type(e).__name__}: {e}"
    value = _OPS_CACHE[name]
    if isinstance(value, str):
        _unavailable(value)
    return value


@pytest.fixture(params=sorted(backend_names()))
def neutral_ops(request) -> Ops:
    return load_ops(request.param)


def _unavailable(message: str):
    if REQUIRE_ALL_BACKENDS:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module", params=sorted(backend_names()))
def backend(request):
    """The :class:`~prunekit.contract.backend.Backend` (model handles, Trainer), once per backend; skipped where it cannot be
    loaded, except in CI (or with PRUNEKIT_REQUIRE_BACKENDS=1), where that fails."""
    try:
        return get_backend(request.param)
    except Exception as e:
        _unavailable(f"backend {request.param!r} unavailable: {type(e).__name__}: {e}")


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread():
    """Tiny models train far faster on one thread, and don't stall when the cores are shared."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: ResNet-20 trained on real CIFAR-10 (tests/data/make_trained_weights.py made it)
TRAINED_WEIGHTS = os.path.join(ROOT, "tests", "data", "resnet20_cifar10.npz")


@pytest.fixture(scope="session")
def trained_state():
    """The trained ResNet-20's state under the shared names (spectra that decay, unlike random ones)."""
    import numpy as np

    if not os.path.exists(TRAINED_WEIGHTS):
        pytest.fail(f"trained weights missing: {TRAINED_WEIGHTS}")
    return dict(np.load(TRAINED_WEIGHTS))


#: ``<backend>.txt``: what is known not to work on that backend (see :func:`read_xfails`)
XFAILS_DIR = os.path.join(ROOT, "tests", "xfails")


def read_xfails(path: str) -> dict:
    """``{entry: reason}`` from one xfails file. Each line is a test id
    (``tests/<group>/x.py::test_y``, with or without its ``[parameters]``) or a conformance case
    name, then ``#`` and the reason; lines that start with ``#`` are comments. A test id whose
    file does not exist (a test moved or renamed) is an error, not an entry that silently
    matches nothing."""
    entries = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            entry, _, reason = (part.strip() for part in line.partition("#"))
            if entry and not reason:
                raise pytest.UsageError(f"{path}:{number}: {entry!r} has no reason ('# why' after it)")
            if "::" in entry and not os.path.isfile(os.path.join(ROOT, entry.split("::", 1)[0])):
                raise pytest.UsageError(f"{path}:{number}: {entry!r} names no test file (moved or renamed?)")
            if entry:
                entries[entry] = reason
    return entries


def _xfail_keys(item, backend: str):
    """The entries of ``<backend>.txt`` that name ``item``: its full id; its id without the
    parameters where it runs on ``backend``; the conformance case it runs."""
    yield item.nodeid
    params = getattr(getattr(item, "callspec", None), "params", {})
    if backend in [v for v in params.values() if isinstance(v, str)]:
        yield item.nodeid.split("[", 1)[0]
    if "case_name" in params:
        yield params["case_name"]


def pytest_collection_modifyitems(config, items):
    """Known-unsupported tests, listed per backend in ``tests/xfails/<backend>.txt``, are marked
    ``xfail(strict=True)`` with the listed reason: they must fail (a pass means the entry is
    stale and fails the run), and no test skips them itself."""
    if not os.path.isdir(XFAILS_DIR):
        return
    for name in sorted(os.listdir(XFAILS_DIR)):
        backend, ext = os.path.splitext(name)
        if ext != ".txt":
            continue
        if backend not in backend_names():
            raise pytest.UsageError(f"{os.path.join(XFAILS_DIR, name)}: no backend named {backend!r}")
        entries = read_xfails(os.path.join(XFAILS_DIR, name))
        for item in items:
            reason = next((entries[k] for k in _xfail_keys(item, backend) if k in entries), None)
            if reason is not None:
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"known unsupported on {backend}: {reason}"))
