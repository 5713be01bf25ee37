"""The backend registry and protocol (:mod:`prunekit.contract.backend`): built-in registrations,
aliases and the default, third-party backends by :func:`register_backend` and by entry point,
errors, and each built-in :class:`Backend` against its handles."""
import importlib.metadata
import logging
import textwrap

import numpy as np
import pytest

import prunekit.contract.backend as registry
from prunekit.contract.backend import (Backend, BackendSpec, backend_names, backend_of, backend_spec,
                                       check_backend_name, default_backend_name, get_backend, register_backend)
from prunekit.contract.ops import Ops
from prunekit.errors import BackendUnavailable, ConfigError, ModelError

#: a third-party backend: every member of the protocol, doing nothing useful
PLUGIN_SOURCE = textwrap.dedent('''
    from prunekit.contract.backend import Backend, BackendSpec
    from prunekit.contract.numpy_ops import NumpyOps

    SPEC = BackendSpec(name="toy", module="toy_backend", framework="numpy", title="Toy", aliases=("plaything",),
                       launcher="toyrun -n N", export_formats={"toy": ".toy"})


    class ToyBackend(Backend):
        name = "toy"
        Ops = NumpyOps
        Trainer = PruningSession = DistributedTrainer = object

        def model_handle(self, *args, **kwargs): raise NotImplementedError
        def wrap(self, model, input_shape, model_name="model"): raise NotImplementedError
        def norm_layers(self, handle): return []
        def probe_channels(self, handle, perturb, rows): return {}
        def compact(self, handle, keep): return handle
        def apply_decompositions(self, handle, decompositions): return handle
        def channel_gates(self, handle, groups): return None
        def capture_training_state(self, trainer): return {}
        def restore_training_state(self, trainer, state): pass
        def rng_state(self): return {}
        def set_rng_state(self, state): pass
        def make_deterministic(self, threads=1): pass
        def launched(self, env=None): return False
        def launcher_world_size(self, env=None): return 1
        def init_distributed(self, device=None): raise NotImplementedError
        def export(self, fmt, structure, state, out, x, reference, tolerance): return {"path": out}
        def time_inference(self, handles, batch, warmup=2, repeats=5, deploy=None, rounds=1): return []


    BACKEND = ToyBackend()
''')


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry as it is now, restored after the test."""
    registry._load()
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    return registry


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_backend.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_backend"


def test_builtin_registrations():
    assert backend_names()[:2] == ["torch", "mindspore"]
    assert default_backend_name() == "torch"
    assert check_backend_name("PyTorch") == "torch" and check_backend_name("ms") == "mindspore"
    with pytest.raises(ConfigError, match=r"unknown backend 'jax'; allowed: torch, mindspore"):
        check_backend_name("jax")
    spec = backend_spec("mindspore")
    assert spec.framework == "mindspore" and spec.module == "prunekit.backends.mindspore"
    formats = {f for s in registry.backend_specs() for f in s.export_formats}
    assert {"onnx", "mindir", "torch", "mindspore-ckpt"} <= formats


def test_register_backend_and_use_it(clean_registry, toy_module):
    import toy_backend

    register_backend(toy_backend.SPEC)
    assert backend_names()[-1] == "toy" and check_backend_name("Plaything") == "toy"
    toy = get_backend("toy")
    assert toy is toy_backend.BACKEND and isinstance(toy, Backend)
    assert toy.framework == "numpy" and toy.launcher == "toyrun -n N" and toy.export_formats == {"toy": ".toy"}

    from prunekit.app.export import export_formats
    assert export_formats()["toy"] == ("toy", ".toy")

    class Handle:
        backend = "toy"
    assert backend_of(Handle()) is toy


def test_registration_errors(clean_registry):
    with pytest.raises(ConfigError, match="backend name 'torch' is taken"):
        register_backend(BackendSpec(name="torch", module="x", framework="x"))
    with pytest.raises(ConfigError, match="alias 'ms' of 'other' is taken by backend 'mindspore'"):
        register_backend(BackendSpec(name="other", module="x", framework="x", aliases=("ms",)))
    with pytest.raises(ConfigError, match="backend name 'pytorch' is an alias of backend 'torch'"):
        register_backend(BackendSpec(name="pytorch", module="x", framework="x"))
    with pytest.raises(ConfigError, match="'other' asks to be the default, but 'torch' is"):
        register_backend(BackendSpec(name="other", module="x", framework="x", default=True))
    with pytest.raises(ConfigError, match="lower-case word"):
        register_backend(BackendSpec(name="Other", module="x", framework="x"))
    with pytest.raises(ConfigError, match="expects a BackendSpec"):
        register_backend({"name": "other"})


def test_missing_framework_or_adapter_is_unavailable(clean_registry, toy_module):
    register_backend(BackendSpec(name="ghost", module="toy_backend", framework="prunekit_no_such_framework"))
    with pytest.raises(BackendUnavailable, match="backend 'ghost' needs the prunekit_no_such_framework package"):
        get_backend("ghost")
    assert "ghost" not in registry.available_backends()
    register_backend(BackendSpec(name="named", module="toy_backend", framework="numpy"))
    with pytest.raises(BackendUnavailable, match="toy_backend.BACKEND calls itself 'toy'"):
        get_backend("named")
    register_backend(BackendSpec(name="empty", module="prunekit.errors", framework="numpy"))
    with pytest.raises(BackendUnavailable, match="module prunekit.errors has no BACKEND"):
        get_backend("empty")


def test_entry_points_register_backends(monkeypatch, toy_module, caplog):
    monkeypatch.setattr(registry, "_SPECS", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_LOADED", False)
    points = [importlib.metadata.EntryPoint("toy", "toy_backend:SPEC", registry.ENTRY_POINT_GROUP),
              importlib.metadata.EntryPoint("broken", "toy_backend:NOTHING", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group: [p for p in points if p.group == group])
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        names = backend_names()
    assert names == ["torch", "mindspore", "toy"]  # built-ins first, then the plugins
    assert "ignoring backend entry point 'broken'" in caplog.text
    assert get_backend("plaything").name == "toy"


def test_handle_without_backend():
    with pytest.raises(ModelError, match="object is not a backend model handle: it declares no backend"):
        backend_of(object())


# ---------------------------------------------------------------------------- the built-in backends
def test_builtin_backend_implements_the_protocol(backend):
    assert isinstance(backend, Backend) and backend is get_backend(backend.name)
    assert backend_spec(backend.name).module.endswith(backend.name)
    assert issubclass(backend.Ops, Ops) and backend.Ops().name == backend.name
    for member in ("Trainer", "PruningSession", "DistributedTrainer"):
        assert isinstance(getattr(backend, member), type), member
    assert backend.export_formats and backend.launcher
    assert backend.launcher_world_size({}) == 1 and not backend.launched({})
    handle = backend.model_handle("mnist_cnn", 10, 1, 28, seed=3)
    assert handle.backend == backend.name and backend_of(handle) is backend
    wrapped = backend.wrap(handle.model, handle.input_shape, "mine")
    assert wrapped.backend == backend.name and wrapped.model_name == "mine"
    assert [l.name for l in wrapped.layers] == [l.name for l in handle.layers]
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(wrapped.predict(x), handle.predict(x))
