"""Which model ``--model`` names, and on which backend it is built.

A model is named in one of three ways:

* a **reference model** (``resnet20``, ``vgg16``, ...: :mod:`prunekit.contract.reference_models`),
  built by every backend with the same parameter names and the same seeded initialisation. Only
  these twins move between backends: a plan or weights made on one replays on the other;
* ``<source>:<name>``, a model of a model collection that a backend provides (the sources each
  backend registers in its :class:`~prunekit.contract.backend.BackendSpec`, ``model_sources``;
  ``prunekit list`` shows those whose package is installed). It is built by that backend alone;
* ``package.module:function``, a user's own callable returning a network of the run's backend,
  called with the recipe's ``model_args`` (and ``num_classes`` / ``in_channels`` when it takes
  them and ``model_args`` does not set them).

:func:`parse_model` reads the name and checks that it fits the backend (one clear
:class:`~prunekit.errors.ConfigError` otherwise) without importing any package;
:func:`build_handle` builds the model through the backend. Nothing here names a framework: the
sources come from the backend registry.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from prunekit.contract.backend import backend_specs, check_backend_name
from prunekit.contract.reference_models import MODELS
from prunekit.errors import ConfigError

REFERENCE, SOURCE, FACTORY = "reference", "source", "factory"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``--model``: ``kind`` is :data:`REFERENCE`, :data:`SOURCE` or :data:`FACTORY`;
    ``source`` the collection (or the factory's module path), ``name`` the model (or function);
    ``backend`` the backend that builds it (None: any, for reference models and factories);
    ``package`` the import name of the package it needs; ``args`` the keyword arguments of the
    run (``model_args``), attached by :func:`build_handle`."""

    text: str
    kind: str
    source: str = ""
    name: str = ""
    backend: Optional[str] = None
    package: str = ""
    args: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_reference(self) -> bool:
        return self.kind == REFERENCE


def registered_sources() -> Dict[str, Tuple[str, str]]:
    """Every model source the registered backends provide: ``{source: (backend, package)}``."""
    out: Dict[str, Tuple[str, str]] = {}
    for spec in backend_specs():
        for source, package in spec.model_sources.items():
            out.setdefault(source, (spec.name, package))
    return out


def installed(package: str) -> bool:
    """Whether ``package`` can be imported here (found without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def available_sources() -> Dict[str, List[str]]:
    """``{backend: [its sources whose package is installed]}``, for help texts and ``prunekit list``."""
    out: Dict[str, List[str]] = {}
    for source, (backend, package) in registered_sources().items():
        if installed(package):
            out.setdefault(backend, []).append(source)
    return out


def describe_sources() -> str:
    """One line: the reference models, the installed sources per backend, the factory form."""
    parts = [f"{', '.join(f'{s}:NAME' for s in sources)} ({backend})"
             for backend, sources in available_sources().items()]
    return "; ".join(parts + ["package.module:function (a factory returning a network)"])


def parse_model(text: str, backend: Optional[str] = None) -> ModelSource:
    """The :class:`ModelSource` that ``text`` names, checked against ``backend`` (a registered
    name or alias; None: not checked). Raises :class:`ConfigError` naming the value and what is
    allowed: an unknown reference model or source, a source of another backend, a source whose
    package is not installed, a factory module that cannot be found."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"model must be a name, got {text!r}")
    text = text.strip()
    backend = check_backend_name(backend) if backend is not None else None
    if ":" not in text:
        key = text.lower()
        if key not in MODELS:
            raise ConfigError(f"unknown model {text!r}; allowed: the reference models {', '.join(MODELS)}, "
                              f"or {describe_sources()}")
        return ModelSource(text=key, kind=REFERENCE, name=key)
    source, _, name = text.partition(":")
    sources = registered_sources()
    if source in sources:
        owner, package = sources[source]
        if not _NAME.match(name):
            raise ConfigError(f"model {text!r}: expected {source}:NAME, e.g. a model name of {source}")
        if backend is not None and backend != owner:
            raise ConfigError(f"model {text!r} is a {source} model, built by the {owner} backend only, "
                              f"not by backend {backend!r} (only the reference models {', '.join(MODELS)} "
                              f"run on every backend); use --backend {owner}")
        if not installed(package):
            raise ConfigError(f"model {text!r} needs the {package} package, which is not installed here")
        return ModelSource(text=text, kind=SOURCE, source=source, name=name, backend=owner, package=package)
    if not _DOTTED.match(source) or not name.isidentifier():
        raise ConfigError(f"model {text!r}: expected a reference model ({', '.join(MODELS)}), "
                          f"{describe_sources()}")
    if not installed(source):
        known = ", ".join(sources) or "none"
        raise ConfigError(f"model {text!r}: no module {source!r} can be imported (model sources: {known}; "
                          "a factory is package.module:function on the Python path)")
    return ModelSource(text=text, kind=FACTORY, source=source, name=name, backend=None, package=source.split(".")[0])


def load_factory(model: ModelSource) -> Callable:
    """The callable a :data:`FACTORY` model names (imports its module)."""
    try:
        module = importlib.import_module(model.source)
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"model {model.text!r}: importing {model.source} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, model.name, None)
    if not callable(fn):
        raise ConfigError(f"model {model.text!r}: {model.source} has no callable {model.name!r}")
    return fn


def factory_kwargs(fn: Callable, model_args: Mapping[str, Any], num_classes: int, in_channels: int,
                   in_channels_names: Tuple[str, ...] = ("in_channels", "in_chans")) -> Dict[str, Any]:
    """Keyword arguments for a model factory: ``model_args``, plus ``num_classes`` and the input
    channels where ``fn`` takes them by one of those names and ``model_args`` does not set them."""
    kwargs = dict(model_args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    for key in in_channels_names:
        if key in params and key not in kwargs:
            kwargs[key] = in_channels
            break
    return kwargs


def call_factory(fn: Callable, kwargs: Mapping[str, Any], what: str):
    """``fn(**kwargs)``, a failure reported as a :class:`ConfigError` naming ``what`` and the arguments."""
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {what}: calling it with {dict(kwargs)} failed: {e}") from None


def build_handle(backend, model: str, num_classes: int, in_channels: int, image_size: int, seed: int = 0,
                 device: Optional[str] = None, width: int = 1, model_args: Optional[Mapping[str, Any]] = None):
    """A model handle for ``model`` (any of the three kinds) on ``backend`` (a
    :class:`~prunekit.contract.backend.Backend`): the reference models with the shared seeded
    initialisation, the others with their framework's own, seeded by ``seed``."""
    source = parse_model(model, backend.name)
    if source.is_reference:
        if model_args:
            raise ConfigError(f"model_args {dict(model_args)} are for source and factory models; reference model "
                              f"{source.name!r} takes none")
        return backend.model_handle(source.name, num_classes, in_channels, image_size, seed=seed, device=device,
                                    width=width)
    if width != 1:
        raise ConfigError(f"width {width} applies to reference models only, not {model!r}")
    if model_args is not None and not isinstance(model_args, Mapping):
        raise ConfigError(f"model_args must be a mapping of keyword arguments, got {model_args!r}")
    source = replace(source, args=dict(model_args or {}))
    return backend.source_model_handle(source, num_classes, in_channels, image_size, seed=seed, device=device)


def check_replay(model: str, from_backend: str, to_backend: str, what: str = "plan") -> None:
    """Raise :class:`ConfigError` when a ``what`` made for ``model`` on ``from_backend`` is to be
    replayed on another backend and ``model`` is not a reference model (only the twins share
    their parameter names across backends)."""
    if not from_backend or not to_backend or check_backend_name(from_backend) == check_backend_name(to_backend):
        return
    if ":" in str(model) or str(model).lower() not in MODELS:
        raise ConfigError(f"{what}: model {model!r} of a {from_backend} run cannot be rebuilt on backend "
                          f"{to_backend!r}; only the reference models ({', '.join(MODELS)}) replay across backends")
