"""The one registry of pruning algorithms: name -> :class:`~prunekit.algorithms.base.Algorithm`
subclass, whose ``config_class`` (a dataclass) lists its settings.

Every algorithm module registers its class with :func:`register_algorithm`; the job, the
command line (``--set KEY=VALUE``), recipes and library users build algorithms through
:func:`make_algorithm`, which checks each setting's name and type against the config class
before the config's own range checks run, so a mistake is one :class:`ConfigError` line naming
the algorithm, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from collections import abc
from typing import Any, Dict, List

from prunekit.errors import ConfigError

_REGISTRY: Dict[str, type] = {}
#: algorithms the project plans; named here so an error can tell "not yet" from "unknown"
PLANNED = ()
#: the algorithm of a run that names none
DEFAULT_ALGORITHM = "magnitude"


def register_algorithm(cls: type) -> type:
    """Register an Algorithm subclass under ``cls.name`` (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or name == "base":
        raise ConfigError(f"{cls.__name__}.name must be a lower-case algorithm name, got {name!r}")
    if not (isinstance(cls.config_class, type) and dataclasses.is_dataclass(cls.config_class)):
        raise ConfigError(f"{cls.__name__}.config_class must be a dataclass of settings, got {cls.config_class!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ConfigError(f"algorithm name {name!r} is taken by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def algorithm_names() -> List[str]:
    """The registered algorithm names, in registration order."""
    return list(_REGISTRY)


def algorithm_class(name: str) -> type:
    """The Algorithm subclass registered as ``name`` (case-insensitive)."""
    key = str(name).lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    available = ", ".join(sorted(_REGISTRY))
    if key in PLANNED:
        raise ConfigError(f"algorithm {name!r} is not implemented yet; available: {available}")
    raise ConfigError(f"unknown algorithm {name!r}; available: {available}")


def setting_types(name: str) -> Dict[str, Any]:
    """``{setting: type hint}`` of algorithm ``name``'s config class."""
    config_cls = algorithm_class(name).config_class
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def algorithm_config(name: str, **settings):
    """Algorithm ``name``'s config built from ``settings``: unknown keys and wrong types are
    refused here, values out of range by the config class itself."""
    cls = algorithm_class(name)
    types = setting_types(name)
    unknown = sorted(set(settings) - set(types))
    if unknown:
        raise ConfigError(f"unknown {cls.name} setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(types))}")
    values = {k: check_value(f"{cls.name} setting {k!r}", v, types[k]) for k, v in settings.items()}
    try:
        return cls.config_class(**values)
    except (TypeError, ValueError) as e:  # a config check that assumed another type
        raise ConfigError(f"bad {cls.name} setting: {e}") from None


def make_algorithm(name: str, config=None, **settings):
    """A new algorithm ``name`` from its settings as keyword arguments, or from a ready ``config``
    (an instance of its ``config_class``)."""
    cls = algorithm_class(name)
    if config is None:
        config = algorithm_config(name, **settings)
    elif settings:
        raise ConfigError(f"{cls.name}: give either config= or settings ({', '.join(sorted(settings))}), not both")
    elif not isinstance(config, cls.config_class):
        raise ConfigError(f"{cls.name} config must be a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(config=config)


def check_value(label: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a type hint (bool, int, float, str, a mapping, a sequence of
    strings, Optional of those); returns it normalised (an int for a float setting becomes a
    float, one string for a sequence of strings a 1-tuple). ``label`` names the setting in the
    error, e.g. ``"rpg setting 'lam'"`` or ``"recipe key 'sparsity'"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{label} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
        return value
    if hint is dict or origin in (dict, abc.Mapping):
        if not isinstance(value, abc.Mapping):
            raise ConfigError(f"{label} must be a mapping of settings, got {value!r}")
        return dict(value)
    if origin in (abc.Sequence, list, tuple) and args[:1] == (str,):
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{label} must be a name or a list of names, got {value!r}")
        return tuple(value)
    return value
