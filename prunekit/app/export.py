"""Exports of pruned models, and the structure description that lets either backend rebuild them.

A pruned model is dense and shaped like the reference model, except after

* channel compaction (``backend.compact``): narrower layers, described by the kept channel
  indices per channel group (``kept_channels``), and
* TRP's final decomposition (``backend.apply_decompositions``): a conv replaced by two convs
  ``<layer>.0`` / ``<layer>.1``, described by the scheme and the rank per layer.

:class:`ModelStructure` holds exactly that, plus the model name and input geometry; it is saved
as JSON next to exported weights (``model.pt`` -> ``model.structure.json``). ``build(backend,
state)`` rebuilds the model on any backend: reference model, then compaction, then the
decompositions replayed at the recorded ranks (the factors' strides and paddings come from
:func:`prunekit.algorithms.trp.decomposition_factors`, the function that made them), then the
weights loaded by shared name with every name and shape checked.

:func:`export_run` is ``prunekit export``: it reads a run folder written by
:func:`prunekit.app.job.run` (``weights.npz``, ``report.json``, ``plan.json``), rebuilds the model on
the run's backend as the reference, writes the file through the backend that writes the format
(:meth:`prunekit.contract.backend.Backend.export`) and checks the file's outputs against the
reference. Nothing here imports a framework; the formats come from the backend registry
(:func:`export_formats`). The structure of the backends' own writers (temporary file, check,
rename; the structure description beside the weights) is here too (:func:`export_graph`,
:func:`export_reloaded`, :func:`make_export`): a backend passes only the calls that write and
read its files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.contract.backend import backend_specs, check_backend_name, default_backend_name, get_backend
from prunekit.errors import ConfigError, PlanError

STRUCTURE_FORMAT = "prunekit-structure/1"

#: data set -> (classes, input channels, image size): the input geometry of a run's model
DATASET_GEOMETRY = {"cifar10": (10, 3, 32), "mnist": (10, 1, 28), "fashion_mnist": (10, 1, 28)}

#: default tolerance on max |exported - reference| / max(1, max |reference|)
DEFAULT_TOLERANCE = 1e-4


def structure_path(weights_path: str) -> str:
    """Where the structure description of a weights file lives: ``a/model.pt`` -> ``a/model.structure.json``."""
    base, _ = os.path.splitext(weights_path)
    return base + ".structure.json"


@dataclass
class ModelStructure:
    model: str
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: int = 1
    kept_channels: Dict[str, List[int]] = field(default_factory=dict)  # group name -> kept indices (compaction)
    scheme: str = ""                                                   # TRP decomposition scheme
    ranks: Dict[str, int] = field(default_factory=dict)                # decomposed conv -> rank
    model_args: Dict[str, object] = field(default_factory=dict)        # keyword arguments of a source/factory model

    # ------------------------------------------------------------------ construction
    @classmethod
    def of(cls, model: str, handle=None, decompositions: Sequence = (), kept_channels: Optional[dict] = None,
           num_classes: Optional[int] = None, width: int = 1) -> "ModelStructure":
        """The structure of a model built from reference ``model``: geometry from ``handle``
        (its input shape; classes from its last layer) unless given, ``decompositions`` as passed
        to ``apply_decompositions``, ``kept_channels`` as passed to ``compact``."""
        in_channels, image_size = 3, 32
        if handle is not None:
            in_channels, image_size = int(handle.input_shape[0]), int(handle.input_shape[1])
            if num_classes is None:
                num_classes = int(handle.layers[-1].out_channels)
        schemes = {d.scheme for d in decompositions}
        if len(schemes) > 1:
            raise ConfigError(f"decompositions mix schemes {sorted(schemes)}; a structure records one")
        return cls(model=model, num_classes=int(num_classes or 10), in_channels=in_channels, image_size=image_size,
                   width=int(width), kept_channels={k: sorted(int(i) for i in v) for k, v in (kept_channels or {}).items()},
                   scheme=schemes.pop() if schemes else "", ranks={d.layer: int(d.rank) for d in decompositions})

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": STRUCTURE_FORMAT, "model": self.model, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "image_size": self.image_size, "width": self.width,
                "kept_channels": self.kept_channels, "decomposition": {"scheme": self.scheme, "ranks": self.ranks},
                **({"model_args": self.model_args} if self.model_args else {})}

    @classmethod
    def from_dict(cls, doc: dict, where: str = "structure") -> "ModelStructure":
        if not isinstance(doc, dict) or doc.get("format") != STRUCTURE_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise PlanError(f"{where} is not a prunekit structure description (format {found!r})")
        try:
            dec = doc.get("decomposition") or {}
            s = cls(model=str(doc["model"]), num_classes=int(doc["num_classes"]), in_channels=int(doc["in_channels"]),
                    image_size=int(doc["image_size"]), width=int(doc.get("width", 1)),
                    kept_channels={str(k): [int(i) for i in v] for k, v in (doc.get("kept_channels") or {}).items()},
                    scheme=str(dec.get("scheme") or ""), ranks={str(k): int(v) for k, v in (dec.get("ranks") or {}).items()},
                    model_args=dict(doc.get("model_args") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{where} is damaged: {type(e).__name__}: {e}") from None
        if s.ranks and not s.scheme:
            raise PlanError(f"{where} names decomposed layers but no decomposition scheme")
        return s

    def save(self, path: str) -> str:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "ModelStructure":
        if not os.path.exists(path):
            raise PlanError(f"no structure description at {path} (written next to exported weights)")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"structure description {path} is damaged: {e}") from None
        return cls.from_dict(doc, path)

    # ------------------------------------------------------------------ rebuilding
    def build(self, backend, state: Optional[Dict[str, np.ndarray]] = None):
        """A new model handle of this structure on ``backend`` (a
        :class:`~prunekit.contract.backend.Backend`), holding ``state`` when given (every shared
        name and shape must match)."""
        from prunekit.algorithms.trp import decomposition_factors
        from prunekit.app.model_sources import build_handle

        if ":" in self.model:  # a source or factory model (its backend: a Backend, not a backend package)
            handle = build_handle(backend, self.model, self.num_classes, self.in_channels, self.image_size, seed=0,
                                  width=self.width, model_args=self.model_args)
        else:
            handle = backend.model_handle(self.model, self.num_classes, self.in_channels, self.image_size, seed=0,
                                          width=self.width)
        if self.kept_channels:
            handle = backend.compact(handle, {k: list(v) for k, v in self.kept_channels.items()})
        if self.ranks:
            rng = np.random.default_rng(0)
            decompositions = []
            for layer, rank in self.ranks.items():
                try:
                    info = handle.layer(layer)
                except KeyError:
                    raise PlanError(f"structure decomposes layer {layer!r}, which model {self.model!r} does not have") from None
                # shapes, strides and paddings come from the decomposition itself; the weights
                # are placeholders that the state overwrites
                probe = rng.standard_normal(info.weight_shape)
                bias = np.zeros(info.out_channels, np.float32) if info.has_bias else None
                d = decomposition_factors(probe, bias, info.stride, info.padding, self.scheme, rank=rank, layer=layer)
                if d.rank != rank:
                    raise PlanError(f"layer {layer!r} cannot have rank {rank} (at most {d.rank})")
                decompositions.append(d)
            handle = backend.apply_decompositions(handle, decompositions)
        if state is not None:
            handle.load_state_numpy(state, strict=True)
        return handle

    def example_input(self, batch: int = 8, seed: int = 0) -> np.ndarray:
        """A seeded standard-normal batch of this model's input shape (normalised images are of that scale)."""
        shape = (batch, self.in_channels, self.image_size, self.image_size)
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------- run folders
def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise PlanError(f"no {what} at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{what} {path} is damaged: {e}") from None


def read_state(path: str) -> Dict[str, np.ndarray]:
    """All arrays of an ``.npz`` weights file."""
    if not os.path.exists(path):
        raise PlanError(f"no weights at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:  # an object array is refused, never unpickled
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/npy errors of many kinds
        raise PlanError(f"weights file {path} is damaged: {e}") from None


def load_run(run_dir: str) -> Tuple[ModelStructure, Dict[str, np.ndarray], str]:
    """``(structure, weights, backend name)`` of a run folder written by ``prunekit run``.

    The decomposition comes from the report (scheme, and the ranks, checked against the factor
    shapes in the weights); kept channels from the report's compaction section, else from the
    plan when the weights are narrower than the plan's layers (a channel-masked but uncompacted
    model keeps its shapes and is rebuilt as the reference model).
    """
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run folder {run_dir} does not exist")
    report = _read_json(os.path.join(run_dir, "report.json"), "report")
    state = read_state(os.path.join(run_dir, "weights.npz"))
    run = report.get("run") or {}
    model, dataset = report.get("model"), run.get("dataset")
    recorded = all(isinstance(run.get(k), int) for k in ("num_classes", "in_channels", "image_size"))
    if not model or (dataset not in DATASET_GEOMETRY and not recorded):
        raise PlanError(f"report {os.path.join(run_dir, 'report.json')} does not name a model and a known data set "
                        f"(model {model!r}, data set {dataset!r})")
    backend_name = check_backend_name(run.get("backend") or report.get("backend") or default_backend_name())
    # the run's recorded geometry (an image folder's classes and size), else the data set's
    classes, channels, size = ((run["num_classes"], run["in_channels"], run["image_size"]) if recorded
                               else DATASET_GEOMETRY[dataset])
    structure = ModelStructure(model=model, num_classes=classes, in_channels=channels, image_size=size,
                               model_args=dict(run.get("model_args") or {}))
    dec = report.get("decomposition")
    if dec:
        structure.scheme = str(dec.get("scheme") or "")
        structure.ranks = {str(k): int(v) for k, v in (dec.get("ranks") or {}).items()}
        for layer, rank in structure.ranks.items():
            first, second = state.get(f"{layer}.0.weight"), state.get(f"{layer}.1.weight")
            # the nd scheme's first conv holds rank paths per filter (rank x C_out rows)
            rows = rank * (second.shape[0] if structure.scheme == "nd" and second is not None else 1)
            if first is None or first.shape[0] != rows:
                raise PlanError(f"report says {layer!r} was decomposed at rank {rank}, but weights.npz has "
                                f"{'no ' + layer + '.0.weight' if first is None else 'rank ' + str(first.shape[0])}")
    compaction = report.get("compaction")
    plan_json = os.path.join(run_dir, "plan.json")
    if compaction:  # job.run compacted a channel-pruned model: the kept channels are in the report
        try:
            structure.kept_channels = {str(k): sorted(int(i) for i in g["kept_channels"])
                                       for k, g in compaction["groups"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"report {os.path.join(run_dir, 'report.json')}: damaged compaction section ({e})") from None
    elif os.path.exists(plan_json):
        from prunekit.decisions.plan import PruningPlan
        plan = PruningPlan.load(plan_json)
        if plan.kept_channels and not _shapes_match_reference(plan, state):
            structure.kept_channels = {k: sorted(int(i) for i in v) for k, v in plan.kept_channels.items()}
    return structure, state, backend_name


def _shapes_match_reference(plan, state: Dict[str, np.ndarray]) -> bool:
    """Whether the prunable weights have the shapes the plan recorded for the reference model."""
    for name, shape in plan.layer_signature:
        w = state.get(f"{name}.weight")
        if w is not None and tuple(w.shape) != tuple(shape):
            return False
    return True


def export_formats() -> Dict[str, Tuple[str, str]]:
    """Every registered backend's export formats: ``{format: (backend name, default file suffix)}``."""
    return {fmt: (spec.name, suffix) for spec in backend_specs() for fmt, suffix in spec.export_formats.items()}


def format_writer(fmt: str):
    """The backend that writes ``fmt`` (imports its framework) and the format's default file suffix."""
    formats = export_formats()
    if fmt not in formats:
        raise ConfigError(f"unknown export format {fmt!r}; expected one of {', '.join(formats)}")
    name, suffix = formats[fmt]
    return get_backend(name), suffix


def compare_outputs(got: np.ndarray, reference: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                    what: str = "exported model") -> float:
    """Max abs difference of two output batches; raises ModelError beyond ``tolerance``
    (relative to ``max(1, max |reference|)``)."""
    from prunekit.errors import ModelError

    got, reference = np.asarray(got), np.asarray(reference)
    if got.shape != reference.shape:
        raise ModelError(f"{what} gives outputs of shape {got.shape}, the reference {reference.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - reference))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
    if not np.isfinite(diff) or diff > tolerance * scale:
        raise ModelError(f"{what} differs from the reference by {diff:.3g} (max |reference| {scale:.3g}, "
                         f"tolerance {tolerance:g} relative)")
    return diff


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def write_checked(out: str, tmp: str, write, outputs, reference: np.ndarray, tolerance: float, what: str,
                  leftovers: Sequence[str] = ()) -> float:
    """``write(tmp)``, compare ``outputs(tmp)`` with ``reference`` (:func:`compare_outputs`), then
    rename ``tmp`` to ``out``; returns the max abs difference. On any failure ``tmp`` is removed
    and ``out`` is left as it was; ``leftovers`` (side files of ``tmp``) are removed either way."""
    try:
        write(tmp)
        diff = compare_outputs(outputs(tmp), reference, tolerance, what)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        for path in leftovers:
            _remove(path)
    os.replace(tmp, out)
    return diff


# ---------------------------------------------------------------------------- backend writers
# The structure of every backend's ``export.py``, written once: the backend passes the calls
# that write and read its files.
def check_suffix(path: str, suffix: str, label: str) -> None:
    if not path.endswith(suffix):
        raise ConfigError(f"{label} output {path!r} must end in {suffix}")


def temporary_path(path: str, suffix: str) -> str:
    """Where ``path`` is written before it is checked: ``a/model.pt`` -> ``a/model.tmp.pt`` (the
    suffix kept: some writers append it)."""
    return path[:-len(suffix)] + ".tmp" + suffix


def save_beside_structure(path: str, suffix: str, label: str, write, structure: ModelStructure) -> dict:
    """``write(tmp)`` renamed to ``path``, and ``structure`` saved next to it."""
    check_suffix(path, suffix, label)
    tmp = temporary_path(path, suffix)
    write(tmp)
    os.replace(tmp, path)
    return {"path": path, "structure": structure.save(structure_path(path))}


def export_graph(handle, path: str, suffix: str, label: str, what: str, write, outputs,
                 check_input: Optional[np.ndarray] = None, reference: Optional[np.ndarray] = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write ``handle``'s model in eval mode with ``write(tmp)`` and check ``outputs(tmp, x)`` on
    ``check_input`` (default: 8 seeded normal images) against ``reference`` (default:
    ``handle.predict`` of that batch) before it becomes ``path``; returns ``{"path", "max_abs_diff"}``."""
    check_suffix(path, suffix, label)
    x = check_input if check_input is not None else np.random.default_rng(0).standard_normal(
        (8,) + tuple(handle.input_shape)).astype(np.float32)
    ref = reference if reference is not None else handle.predict(x)
    was_training = handle.set_training(False)
    try:
        diff = write_checked(path, temporary_path(path, suffix), write, lambda tmp: outputs(tmp, x), ref, tolerance,
                             what)
    finally:
        handle.set_training(was_training)
    return {"path": path, "max_abs_diff": diff}


def export_reloaded(handle, structure: ModelStructure, out: str, suffix: str, label: str, what: str, save, load,
                    x: np.ndarray, reference: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """``save(handle, tmp, structure)``, then the outputs of ``load(tmp, structure)`` on ``x``
    checked against ``reference`` before the file becomes ``out``."""
    check_suffix(out, suffix, label)
    tmp = temporary_path(out, suffix)
    diff = write_checked(out, tmp, lambda p: save(handle, p, structure), lambda p: load(p, structure).predict(x),
                         reference, tolerance, what, leftovers=[structure_path(tmp)])
    return {"path": out, "structure": structure.save(structure_path(out)), "max_abs_diff": diff}


def make_export(name: str, graph_format: str, write_graph, native_format: str, native_suffix: str, label: str,
                noun: str, save, load):
    """The ``export(fmt, structure, state, out, x, reference, tolerance)`` of backend ``name``,
    called by :func:`export_run`: it rebuilds the model from ``structure`` + ``state`` on that
    backend and writes it as ``graph_format`` (``write_graph(handle, out, x, reference,
    tolerance)``) or as ``native_format`` (``save(handle, path, structure)``, checked by reloading
    with ``load(path, structure)``), checking the written file's outputs on ``x`` against ``reference``."""

    def export(fmt: str, structure: ModelStructure, state: Dict[str, np.ndarray], out: str, x: np.ndarray,
               reference: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> dict:
        handle = structure.build(get_backend(name), state)
        if fmt == graph_format:
            return write_graph(handle, out, x, reference, tolerance)
        if fmt == native_format:
            return export_reloaded(handle, structure, out, native_suffix, label, f"reloaded {label} {noun}", save, load,
                                   x, reference, tolerance)
        raise ConfigError(f"the {name} backend writes {graph_format} or {native_format}, not {fmt!r}")

    export.__doc__ = (f"Rebuild the model from ``structure`` + ``state`` and write it as ``fmt`` ({graph_format!r} "
                      f"or {native_format!r}), checking the written file's outputs on ``x`` against ``reference``.")
    return export


def export_run(run_dir: str, fmt: str, out: Optional[str] = None, check_batch: int = 8,
               tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Export a run folder's model; returns what was written and the measured output difference."""
    writer, suffix = format_writer(fmt)
    if not isinstance(check_batch, int) or check_batch < 1:
        raise ConfigError(f"check_batch must be a positive integer, got {check_batch!r}")
    structure, state, source = load_run(run_dir)
    from prunekit.app.model_sources import check_replay
    check_replay(structure.model, source, writer.name, f"{fmt} export")
    out = out or os.path.join(run_dir, "model" + suffix)
    if not out.endswith(suffix):
        raise ConfigError(f"{fmt} output {out!r} must end in {suffix}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError(f"output folder {folder} does not exist")
    reference = structure.build(get_backend(source), state)
    x = structure.example_input(check_batch)
    result = writer.export(fmt, structure, state, out, x, reference.predict(x), tolerance)
    result.update({"format": fmt, "source_backend": source, "check_batch": check_batch})
    return result
