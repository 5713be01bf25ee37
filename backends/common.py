"""The part of every adapter's ``backend.py`` that is the same on each framework, written once.

Most :class:`prunekit.contract.backend.Backend` members only call the same-named function of the
same-named file of the adapter's package (``checkpoint.rng_state``, ``compact.compact``,
``export.export``, ...), since every adapter has the same file names (see this package's
docstring). :class:`DelegatingBackend` implements those members once; a backend binds it to its
own package with ``package = __package__`` and keeps in its ``backend.py`` only what differs:
its name, ``Ops``, ``Trainer``, ``PruningSession``, the handle class, where a reference model is
built (:meth:`DelegatingBackend._build_model`) and how its launcher shows in the environment.

Files are imported on first use, so the data-parallel, export, channel-probe and gate files of a
backend stay unimported until the core asks for them.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prunekit.contract.backend import Backend
from prunekit.errors import ModelError, PrunekitError


class DelegatingBackend(Backend):
    """A :class:`Backend` whose members call the files of the package ``package``.

    Subclasses set ``package`` (``__package__`` of their ``backend.py``), ``handle_class`` (the
    :class:`prunekit.contract.handle.ModelHandle` subclass, built as ``handle_class(model,
    input_shape, model_name)``), and the members left abstract here: ``name``, ``Ops``,
    ``Trainer``, ``PruningSession``, ``launched`` and ``launcher_world_size``.
    """

    #: the adapter package whose files the members call, e.g. ``"prunekit.backends.torch"``
    package: ClassVar[str]
    #: the backend's model handle class
    handle_class: ClassVar[type]

    def _module(self, file: str) -> ModuleType:
        """The file ``file`` (without ``.py``) of this backend's package, imported if need be."""
        return importlib.import_module(f".{file}", type(self).package)

    def configure_process(self) -> None:
        self._module("runtime").configure_process()

    def check_device(self, device: Optional[str]) -> None:
        self._module("runtime").check_device(device)

    # ------------------------------------------------------------------ models
    def _build_model(self, name: str, num_classes: int, in_channels: int, width: int, device: Optional[str]):
        """The framework model of reference model ``name`` (``models.build_model``), on ``device``;
        this default leaves ``device`` to the framework."""
        return self._module("models").build_model(name, num_classes, in_channels, width)

    def model_handle(self, name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                     seed: int = 0, device: Optional[str] = None, width: int = 1):
        model = self._build_model(name, num_classes, in_channels, width, device)
        handle = self.handle_class(model, (in_channels, image_size, image_size), name)
        handle.initialize(seed)
        return handle

    def wrap(self, model: Any, input_shape: Sequence[int], model_name: str = "model"):
        return self.handle_class(model, input_shape, model_name)

    # models named by a source, and weight files in the framework's format (``zoo.py``)
    def source_model_handle(self, source, num_classes: int, in_channels: int, image_size: int, seed: int = 0,
                            device: Optional[str] = None):
        model = self._module("zoo").build_network(source, num_classes, in_channels, seed, device)
        shape = (in_channels, image_size, image_size)
        try:
            return self.handle_class(model, shape, source.text)  # discovery runs one probe forward
        except PrunekitError:
            raise
        except Exception as e:  # the user's network failed on the run's input
            raise ModelError(f"model {source.text!r} fails on an input of shape {shape}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} (another --input-size, "
                             "or model_args, may fit it)") from None

    def check_model_source(self, source) -> None:
        self._module("zoo").check_source(source)

    def read_weights(self, path: str) -> Dict[str, np.ndarray]:
        return self._module("zoo").read_weights(path)

    def native_state_shapes(self, handle) -> Dict[str, Tuple[int, ...]]:
        return self._module("zoo").state_shapes(handle)

    def load_weights(self, handle, weights: Dict[str, np.ndarray]) -> None:
        self._module("zoo").load_weights(handle, weights)

    # ------------------------------------------------------------------ channels
    def norm_layers(self, handle) -> List[Tuple[str, int]]:
        return self._module("channels").norm_layers(handle)

    def probe_channels(self, handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]],
                       rows: int) -> Dict[str, np.ndarray]:
        return self._module("channels").probe_channels(handle, perturb, rows)

    def compact(self, handle, keep: Mapping[str, Sequence[int]]):
        return self._module("compact").compact(handle, keep)

    def apply_decompositions(self, handle, decompositions: Sequence):
        return self._module("surgery").apply_decompositions(handle, decompositions)

    def channel_gates(self, handle, groups: Mapping[str, Tuple[Tuple[str, ...], int]]):
        return self._module("gates").ChannelGates(handle, groups)

    # ------------------------------------------------------------------ checkpoints
    def capture_training_state(self, trainer) -> dict:
        return self._module("checkpoint").capture_training_state(trainer)

    def restore_training_state(self, trainer, state: dict) -> None:
        self._module("checkpoint").restore_training_state(trainer, state)

    def rng_state(self) -> dict:
        return self._module("checkpoint").rng_state()

    def set_rng_state(self, state: dict) -> None:
        self._module("checkpoint").set_rng_state(state)

    def make_deterministic(self, threads: int = 1) -> None:
        self._module("checkpoint").make_deterministic(threads)

    # ------------------------------------------------------------------ data parallel
    def init_distributed(self, device: Optional[str] = None):
        return self._module("distributed").init_distributed(device)

    @property
    def DistributedTrainer(self) -> type:
        return self._module("distributed").DistributedTrainer

    # ------------------------------------------------------------------ export, timing
    def export(self, fmt: str, structure, state: Dict[str, np.ndarray], out: str, x: np.ndarray,
               reference: np.ndarray, tolerance: float) -> dict:
        return self._module("export").export(fmt, structure, state, out, x, reference, tolerance)

    def time_inference(self, handles: Sequence, batch: int, warmup: int = 2, repeats: int = 5,
                       deploy: Optional[str] = None, rounds: int = 1) -> List[dict]:
        # None leaves the timing file's own default deploy (it differs per framework)
        deploy_arg = {} if deploy is None else {"deploy": deploy}
        return self._module("timing").time_inference(handles, batch, warmup, repeats, rounds=rounds, **deploy_arg)
