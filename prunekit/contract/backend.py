"""The backend protocol (:class:`Backend`) and the registry that finds a backend by name.

A backend adapts one framework to the core: model handles, training drivers, channel probes,
compaction, checkpoints, data parallelism, export and timing. :class:`Backend` lists everything
the core asks of one; the core reaches a backend only through this module, by name
(:func:`get_backend`) or from a model handle (:func:`backend_of`), never by module paths.

The registry holds a :class:`BackendSpec` per backend: its name, the module holding its
:class:`Backend` instance (as ``BACKEND``), the framework's import name, and the descriptive data
that help texts need without importing the framework (title, aliases, launcher, export formats).
Registering imports nothing; :func:`get_backend` imports the framework, then the adapter, on first
use. Specs come from

* the built-in backends: ``BUILTIN`` in :mod:`prunekit.backends` (the adapter layer's package
  itself imports no framework, so reading it here is safe);
* installed distributions, through the entry-point group ``prunekit.backends``: each entry point
  loads a :class:`BackendSpec` (define it in a module that imports no framework);
* :func:`register_backend` at run time.
"""
from __future__ import annotations

import abc
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prunekit.errors import BackendUnavailable, ConfigError, ModelError

log = logging.getLogger(__name__)

#: entry-point group through which installed distributions add backends
ENTRY_POINT_GROUP = "prunekit.backends"


# ---------------------------------------------------------------------------- the protocol
class Backend(abc.ABC):
    """Everything the core asks of a framework adapter.

    A backend module exposes one instance as ``BACKEND``; :func:`get_backend` returns it. The
    members below are the whole interface: the core uses nothing else of a backend. Handles are
    :class:`prunekit.contract.handle.ModelHandle`\\ s; names are the shared parameter names.
    """

    # ------------------------------------------------------------------ identity
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The registered name (``--backend``, ``PruningPlan.backend``, ``ModelHandle.backend``)."""

    @property
    def spec(self) -> "BackendSpec":
        """This backend's registration (:class:`BackendSpec`)."""
        return backend_spec(self.name)

    @property
    def framework(self) -> str:
        """Import name of the framework, named when it fails to import (:class:`BackendUnavailable`)."""
        return self.spec.framework

    @property
    @abc.abstractmethod
    def Ops(self) -> type:
        """The :class:`prunekit.contract.ops.Ops` subclass on this framework's tensors; ``Ops()``
        gives an instance with the framework's defaults."""

    def configure_process(self) -> None:
        """Process-wide settings the framework needs before its first computation (device choice,
        thread pools, library caps). The backend package calls it once on import; calling it
        again changes nothing already chosen. Does nothing unless a backend overrides it."""

    def check_device(self, device: Optional[str]) -> None:
        """Refuse (:class:`prunekit.errors.ConfigError`, naming the device and what is allowed) a
        ``device`` this process cannot use, before any data is read; None is always accepted.
        Accepts everything unless a backend overrides it."""

    # ------------------------------------------------------------------ models
    @abc.abstractmethod
    def model_handle(self, name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     seed: int = 0, device: Optional[str] = None, width: int = 1):
        """Reference model ``name`` (:mod:`prunekit.contract.reference_models`) for images of
        ``in_channels`` x ``image_size`` x ``image_size``, ``width`` times as wide, with the shared
        seeded initialisation (identical on every backend for a seed), on ``device`` (None: the
        framework's default), wrapped in a :class:`ModelHandle`."""

    @abc.abstractmethod
    def wrap(self, model: Any, input_shape: Sequence[int], model_name: str = "model"):
        """A :class:`ModelHandle` for a user's own network ``model`` (a framework module) taking
        inputs of ``input_shape`` (C, H, W); its weights are left as they are."""

    def owns_model(self, model: Any) -> bool:
        """Whether ``model`` is a network of this backend's framework (what :meth:`wrap` takes).
        The default knows none: a backend that wraps user models says so."""
        return False

    def source_model_handle(self, source, num_classes: int, in_channels: int, image_size: int, seed: int = 0,
                            device: Optional[str] = None):
        """A :class:`ModelHandle` for a model named by a source other than the reference models
        (:class:`prunekit.app.model_sources.ModelSource`: a model of one of
        :attr:`BackendSpec.model_sources`, or a user's factory), built with the framework's own
        initialisation seeded by ``seed``. Backends without model sources refuse."""
        raise ConfigError(f"backend {self.name!r} builds only the reference models, not {source.text!r}")

    def check_model_source(self, source) -> None:
        """Raise :class:`ConfigError` unless ``source`` names a model this backend can build (the
        source's package is imported; nothing is built). Backends without model sources refuse."""
        raise ConfigError(f"backend {self.name!r} builds only the reference models, not {source.text!r}")

    @property
    def weight_suffixes(self) -> Tuple[str, ...]:
        """Suffixes of the weight files in this framework's own format (:meth:`read_weights`)."""
        return tuple(self.spec.weight_suffixes)

    def read_weights(self, path: str) -> Dict[str, np.ndarray]:
        """A weights file in this framework's own format as ``{entry name: array}``, named as the
        framework names a model's state, read without running code from the file;
        :meth:`load_weights` puts them into a model. Backends without a format refuse."""
        raise ConfigError(f"backend {self.name!r} reads no weight files of its own; use a .npz of shared names")

    def native_state_shapes(self, handle) -> Dict[str, Tuple[int, ...]]:
        """``{entry name: shape}`` of the handle's model state as :meth:`read_weights` names it."""
        raise ConfigError(f"backend {self.name!r} reads no weight files of its own")

    def load_weights(self, handle, weights: Dict[str, np.ndarray]) -> None:
        """Put weights read by :meth:`read_weights` (already checked against the model) into the model."""
        raise ConfigError(f"backend {self.name!r} reads no weight files of its own")

    # ------------------------------------------------------------------ training
    @property
    @abc.abstractmethod
    def Trainer(self) -> type:
        """The training driver class: ``Trainer(handle, algorithm, optimizer, lr, momentum,
        weight_decay, total_steps=..., ...)`` with ``train_step(x, y)`` and ``evaluate(batches)``;
        it calls the algorithm's hooks (``algorithm`` may be None: dense training)."""

    @property
    @abc.abstractmethod
    def PruningSession(self) -> type:
        """The class that runs an algorithm's hooks around a user's own training loop:
        ``PruningSession(handle, algorithm, optimizer, total_steps)``."""

    # ------------------------------------------------------------------ channels
    @abc.abstractmethod
    def norm_layers(self, handle) -> List[Tuple[str, int]]:
        """``(name, channels)`` of every BatchNorm of the handle's model, in model order."""

    @abc.abstractmethod
    def probe_channels(self, handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]],
                       rows: int) -> Dict[str, np.ndarray]:
        """One eval-mode probe forward of ``rows`` rows (see
        :mod:`prunekit.decisions.channel_groups`): conv/linear outputs replaced by the constant
        ``PROBE_BASE`` (so multiplicative gates pass the signal) and norms made the identity; ``perturb`` maps a producer (a layer name, or None for the image) to
        ``(first row, codes)``, codes of shape (rows of that producer, its channels) added to its
        output. Returns, for every conv/linear/BatchNorm input (by module name) and for the
        model's output (:data:`prunekit.decisions.channel_groups.OUTPUT`), a boolean array
        (rows, channels or features): where the row differs from row 0."""

    @abc.abstractmethod
    def compact(self, handle, keep: Mapping[str, Sequence[int]]):
        """A new, narrower dense model holding only the kept channels: ``keep`` maps a channel
        group name to the kept channel indices. Returns its handle; ``handle`` is unchanged."""

    @abc.abstractmethod
    def apply_decompositions(self, handle, decompositions: Sequence):
        """A new model in which each decomposed conv (:class:`prunekit.algorithms.trp.Decomposition`)
        is replaced by its two convs ``<layer>.0`` / ``<layer>.1``. Returns its handle."""

    @abc.abstractmethod
    def channel_gates(self, handle, groups: Mapping[str, Tuple[Tuple[str, ...], int]]):
        """DSA's channel gates on the handle's model: ``groups`` maps a group name to (its
        BatchNorm names, its channels); one gate vector per group multiplies those BatchNorms'
        outputs. The returned object has ``set({group: gate values})``, ``values()``,
        ``gradients(x, y) -> (loss, {group: dL/dgate})`` (NumPy batch, training mode, only the
        gates differentiated) and ``remove()`` (the model as it was)."""

    # ------------------------------------------------------------------ checkpoints
    @abc.abstractmethod
    def capture_training_state(self, trainer) -> dict:
        """The trainer's optimizer state (and step counters) as a tree of NumPy arrays and plain
        values that :func:`prunekit.app.checkpoint.save` can write."""

    @abc.abstractmethod
    def restore_training_state(self, trainer, state: dict) -> None:
        """Put a :meth:`capture_training_state` tree back into ``trainer`` (same model layout)."""

    @abc.abstractmethod
    def rng_state(self) -> dict:
        """The framework's random generators' state as plain data (NumPy's and Python's are the
        core's: :func:`prunekit.app.checkpoint.host_rng_state`)."""

    @abc.abstractmethod
    def set_rng_state(self, state: dict) -> None:
        """Restore generators captured by :meth:`rng_state`."""

    @abc.abstractmethod
    def make_deterministic(self, threads: int = 1) -> None:
        """Deterministic kernels on ``threads`` threads (bitwise-reproducible resumes on a CPU)."""

    # ------------------------------------------------------------------ data parallel
    @property
    def launcher(self) -> str:
        """The command line that starts a data-parallel run on this backend (for messages)."""
        return self.spec.launcher

    @abc.abstractmethod
    def launched(self, env: Optional[Mapping[str, str]] = None) -> bool:
        """Whether this process was started by the backend's launcher (``env``: default os.environ)."""

    @abc.abstractmethod
    def launcher_world_size(self, env: Optional[Mapping[str, str]] = None) -> int:
        """Worker processes the launcher started (``env``: default os.environ); 1 when none."""

    @abc.abstractmethod
    def init_distributed(self, device: Optional[str] = None):
        """Join the launcher's process group; returns the process's
        :class:`prunekit.app.distributed.Communicator` (also installed as ``world()``)."""

    @property
    @abc.abstractmethod
    def DistributedTrainer(self) -> type:
        """The data-parallel :attr:`Trainer` (same arguments; it shards each global batch)."""

    # ------------------------------------------------------------------ export
    @property
    def export_formats(self) -> Dict[str, str]:
        """The export formats this backend writes: ``{format: default file suffix}``."""
        return dict(self.spec.export_formats)

    @abc.abstractmethod
    def export(self, fmt: str, structure, state: Dict[str, np.ndarray], out: str, x: np.ndarray,
               reference: np.ndarray, tolerance: float) -> dict:
        """Rebuild the model of ``structure`` (:class:`prunekit.app.export.ModelStructure`) holding
        ``state``, write it to ``out`` as ``fmt`` (one of :attr:`export_formats`), and check the
        written file's outputs on ``x`` against ``reference``; returns at least ``{"path",
        "max_abs_diff"}``. A failed check leaves no file."""

    # ------------------------------------------------------------------ timing
    @abc.abstractmethod
    def time_inference(self, handles: Sequence, batch: int, warmup: int = 2, repeats: int = 5,
                       deploy: Optional[str] = None, rounds: int = 1) -> List[dict]:
        """Eval-mode inference time of each handle's model on a random batch of ``batch`` images,
        the models taking turns (:func:`prunekit.app.timing.time_side_by_side`); ``deploy`` names
        how the models run (None: the backend's default). One dict of statistics per handle."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class BackendSpec:
    """How to find and describe a backend without importing its framework."""

    name: str                      # registered name, lower case
    module: str                    # importable module exposing the Backend instance as ``BACKEND``
    framework: str                 # import name of the framework (checked first by get_backend)
    title: str = ""                # the framework's name in help texts
    aliases: Tuple[str, ...] = ()  # other accepted names
    default: bool = False          # the default backend (at most one)
    launcher: str = ""             # command line that starts a data-parallel run
    export_formats: Mapping[str, str] = field(default_factory=dict)  # format -> default file suffix
    weight_suffixes: Tuple[str, ...] = ()  # suffixes of weight files in the framework's own format (--weights)
    #: model sources this backend builds (``--model <source>:<name>``): source -> import name of its package
    model_sources: Mapping[str, str] = field(default_factory=dict)


_SPECS: Dict[str, BackendSpec] = {}
_ALIASES: Dict[str, str] = {}
_LOADED = False


def _add(spec: BackendSpec, replace: bool = False) -> BackendSpec:
    if not isinstance(spec, BackendSpec):
        raise ConfigError(f"register_backend expects a BackendSpec, got {type(spec).__name__}")
    name = str(spec.name)
    if not name or name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"backend name must be a lower-case word, got {name!r}")
    owner = _ALIASES.get(name)
    if owner is not None and owner != name:
        raise ConfigError(f"backend name {name!r} is an alias of backend {owner!r}")
    if name in _SPECS and not replace:
        raise ConfigError(f"backend name {name!r} is taken (by module {_SPECS[name].module}); pass replace=True")
    for alias in spec.aliases:
        taken = _ALIASES.get(alias, alias if alias in _SPECS else None)
        if taken is not None and taken != name:
            raise ConfigError(f"backend alias {alias!r} of {name!r} is taken by backend {taken!r}")
    default = next((s.name for s in _SPECS.values() if s.default and s.name != name), None)
    if spec.default and default is not None:
        raise ConfigError(f"backend {name!r} asks to be the default, but {default!r} is")
    if name in _SPECS:  # replaced: drop the old aliases
        for alias in _SPECS[name].aliases:
            _ALIASES.pop(alias, None)
    _SPECS[name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = name
    return spec


def _load() -> None:
    """Register the built-in backends, then those of installed distributions (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from prunekit import backends as builtin  # the adapter layer's package: no framework import

    for spec in builtin.BUILTIN:
        _add(spec)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _SPECS:
            continue
        try:
            _add(ep.load())
        except Exception as e:  # a broken plugin must not take the other backends down
            log.warning("ignoring backend entry point %r (%s): %s: %s", ep.name, ep.value, type(e).__name__, e)


def register_backend(spec: BackendSpec, replace: bool = False) -> BackendSpec:
    """Register a backend by its :class:`BackendSpec`; ``replace`` lets it take an existing name.
    Raises :class:`ConfigError` for a taken name or alias, or a second default."""
    _load()
    return _add(spec, replace)


def backend_names() -> List[str]:
    """Registered backend names, in registration order (built-ins first)."""
    _load()
    return list(_SPECS)


def backend_specs() -> List[BackendSpec]:
    """Every registered :class:`BackendSpec`, in registration order."""
    _load()
    return list(_SPECS.values())


def default_backend_name() -> str:
    """The backend registered with ``default=True`` (else the first registered)."""
    _load()
    if not _SPECS:
        raise BackendUnavailable("no backend is registered")
    return next((s.name for s in _SPECS.values() if s.default), next(iter(_SPECS)))


def check_backend_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases (any case)."""
    _load()
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        aliases = f" (aliases {', '.join(_ALIASES)})" if _ALIASES else ""
        raise ConfigError(f"unknown backend {name!r}; allowed: {', '.join(_SPECS)}{aliases}")
    return key


def backend_spec(name: str) -> BackendSpec:
    """The :class:`BackendSpec` of backend ``name`` (or an alias)."""
    return _SPECS[check_backend_name(name)]


def get_backend(name: str) -> Backend:
    """The :class:`Backend` registered as ``name`` (or an alias). Imports its framework, then its
    adapter module; raises :class:`BackendUnavailable` when the framework fails to import."""
    spec = backend_spec(name)
    try:
        importlib.import_module(spec.framework)
    except (ImportError, OSError) as e:
        raise BackendUnavailable(f"backend {spec.name!r} needs the {spec.framework} package, "
                                 f"which failed to import: {e}") from None
    backend = getattr(importlib.import_module(spec.module), "BACKEND", None)
    if not isinstance(backend, Backend):
        raise BackendUnavailable(f"backend {spec.name!r}: module {spec.module} has no BACKEND "
                                 f"(a prunekit.contract.backend.Backend instance)")
    if backend.name != spec.name:
        raise BackendUnavailable(f"backend {spec.name!r}: {spec.module}.BACKEND calls itself {backend.name!r}")
    return backend


def available_backends() -> List[str]:
    """Names of the registered backends whose framework imports here."""
    out = []
    for name in backend_names():
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        out.append(name)
    return out


def backend_of(handle) -> Backend:
    """The backend a model handle belongs to (the handle declares it: ``ModelHandle.backend``)."""
    name = getattr(handle, "backend", None)
    if not isinstance(name, str) or not name:
        raise ModelError(f"{type(handle).__name__} is not a backend model handle: it declares no backend "
                         "(ModelHandle.backend); build it with a backend's model_handle or wrap")
    return get_backend(name)
