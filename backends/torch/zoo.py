"""PyTorch models named by a source (``torchvision:NAME``, ``timm:NAME``, ``package.module:function``)
and PyTorch weight files (``--weights model.pt``), for :mod:`prunekit.app.model_sources` and
:mod:`prunekit.app.user_weights`.

Models are built untrained (no download: nothing is fetched at run time), with PyTorch's own
initialisation seeded by the run's seed. Weight files are read with ``torch.load(weights_only=True)``,
which refuses files that would run code when unpickled.
"""
from __future__ import annotations

import pickle
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from prunekit.app.model_sources import FACTORY, call_factory, factory_kwargs, load_factory
from prunekit.errors import ConfigError

#: a BatchNorm step counter: PyTorch's own, absent from other frameworks' states and not a weight
_COUNTERS = "num_batches_tracked"


def _names(source) -> list:
    if source.source == "torchvision":
        import torchvision.models

        return sorted(torchvision.models.list_models())
    import timm

    return sorted(timm.list_models())


def check_source(source) -> None:
    """Raise ConfigError unless ``source`` names a model this backend can build (imports its package)."""
    if source.kind == FACTORY:
        load_factory(source)
        return
    names = _names(source)
    if source.name not in names:
        close = [n for n in names if n.startswith(source.name[:4])][:8]
        raise ConfigError(f"{source.source} has no model {source.name!r}"
                          + (f"; similar: {', '.join(close)}" if close else f" ({len(names)} models)"))


def build_network(source, num_classes: int, in_channels: int, seed: int, device: Optional[str]) -> nn.Module:
    """The untrained network ``source`` names, for ``num_classes`` classes and ``in_channels``
    input channels, initialised by PyTorch under ``torch.manual_seed(seed)``, on ``device``."""
    check_source(source)
    torch.manual_seed(seed)
    args = dict(source.args)
    if source.kind == FACTORY:
        fn = load_factory(source)
        net = call_factory(fn, factory_kwargs(fn, args, num_classes, in_channels), source.text)
    elif source.source == "torchvision":
        import torchvision.models

        if in_channels != 3:
            raise ConfigError(f"model {source.text!r} takes 3-channel images, the data have {in_channels}")
        net = call_factory(lambda **kw: torchvision.models.get_model(source.name, weights=None, **kw),
                           {"num_classes": num_classes, **args}, source.text)
    else:
        import timm

        net = call_factory(lambda **kw: timm.create_model(source.name, pretrained=False, **kw),
                           {"num_classes": num_classes, "in_chans": in_channels, **args}, source.text)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model {source.text!r} returned a {type(net).__name__}, not a PyTorch nn.Module "
                          "(the torch backend trains PyTorch networks)")
    return net.to(device) if device else net


def read_weights(path: str) -> Dict[str, np.ndarray]:
    """A PyTorch state_dict file (``.pt``/``.pth``; a checkpoint holding one under ``state_dict``,
    ``model_state_dict`` or ``model`` too), read with ``weights_only=True``; a data-parallel
    wrapper's ``module.`` prefix is dropped, BatchNorm step counters are left out."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"weights {path}: not a plain PyTorch state_dict (a weights-only load refused it: "
                          f"{str(e).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"weights {path}: cannot be read as a PyTorch file: {e}") from None
    state = obj
    if isinstance(obj, dict) and not _is_state(obj):
        state = next((obj[k] for k in ("state_dict", "model_state_dict", "model") if _is_state(obj.get(k))), None)
    if not _is_state(state):
        raise ConfigError(f"weights {path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names "
                          "to tensors, e.g. torch.save(model.state_dict(), path))")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.detach().cpu().numpy() for k, v in state.items() if not k.endswith(_COUNTERS)}


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def state_shapes(handle) -> Dict[str, Tuple[int, ...]]:
    """``{state_dict name: shape}`` of the handle's model, BatchNorm step counters left out."""
    return {k: tuple(v.shape) for k, v in handle.model.state_dict().items() if not k.endswith(_COUNTERS)}


def load_weights(handle, weights: Dict[str, np.ndarray]) -> None:
    """Copy checked weights (:func:`read_weights`) into the handle's model, by state_dict name."""
    own = handle.model.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(torch.as_tensor(np.asarray(v), dtype=own[k].dtype))
