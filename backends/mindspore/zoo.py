"""MindSpore models named by a source (``mindcv:NAME``, ``package.module:function``) and MindSpore
checkpoints (``--weights model.ckpt``), for :mod:`prunekit.app.model_sources` and
:mod:`prunekit.app.user_weights`.

Models are built untrained (no download: nothing is fetched at run time), with MindSpore's own
initialisation seeded by the run's seed. Checkpoints are read with ``mindspore.load_checkpoint``
(a protocol-buffer file: reading it runs no code from it).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn

from prunekit.app.model_sources import FACTORY, call_factory, factory_kwargs, load_factory
from prunekit.errors import ConfigError

from .ops import check_device


def check_source(source) -> None:
    """Raise ConfigError unless ``source`` names a model this backend can build (imports its package)."""
    if source.kind == FACTORY:
        load_factory(source)
        return
    import mindcv

    names = sorted(mindcv.list_models())
    if source.name not in names:
        close = [n for n in names if n.startswith(source.name[:4])][:8]
        raise ConfigError(f"mindcv has no model {source.name!r}"
                          + (f"; similar: {', '.join(close)}" if close else f" ({len(names)} models)"))


def build_network(source, num_classes: int, in_channels: int, seed: int, device: Optional[str]) -> nn.Cell:
    """The untrained network ``source`` names, for ``num_classes`` classes and ``in_channels``
    input channels, initialised by MindSpore under ``mindspore.set_seed(seed)``; ``device`` must
    be the process's (:func:`check_device`)."""
    check_device(device)
    check_source(source)
    ms.set_seed(seed)
    np.random.seed(seed)  # some model collections draw initial weights from NumPy's global generator
    args = dict(source.args)
    if source.kind == FACTORY:
        fn = load_factory(source)
        net = call_factory(fn, factory_kwargs(fn, args, num_classes, in_channels), source.text)
    else:
        import mindcv

        net = call_factory(lambda **kw: mindcv.create_model(source.name, pretrained=False, **kw),
                           {"num_classes": num_classes, "in_channels": in_channels, **args}, source.text)
    if not isinstance(net, nn.Cell):
        raise ConfigError(f"model {source.text!r} returned a {type(net).__name__}, not a MindSpore nn.Cell "
                          "(the mindspore backend trains MindSpore networks)")
    return net


def read_weights(path: str) -> Dict[str, np.ndarray]:
    """A MindSpore checkpoint (``.ckpt``) as ``{parameter name: array}``."""
    try:
        params = ms.load_checkpoint(path)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"weights {path}: cannot be read as a MindSpore checkpoint: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if not params:
        raise ConfigError(f"weights {path}: the checkpoint holds no parameters")
    return {k: p.asnumpy() for k, p in params.items()}


def state_shapes(handle) -> Dict[str, Tuple[int, ...]]:
    """``{parameter name: shape}`` of the handle's model, as ``mindspore.save_checkpoint`` names them."""
    return {k: tuple(int(d) for d in p.shape) for k, p in handle.model.parameters_dict().items()}


def load_weights(handle, weights: Dict[str, np.ndarray]) -> None:
    """Copy checked weights (:func:`read_weights`) into the handle's model, by parameter name."""
    own = handle.model.parameters_dict()
    for k, v in weights.items():
        p = own[k]
        p.set_data(ms.Tensor(np.ascontiguousarray(v), dtype=p.dtype))
