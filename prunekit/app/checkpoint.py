"""Checkpoints of a ``prunekit run``: the neutral file format, atomic writes, and the checks that
refuse a checkpoint which does not belong to the run being resumed.

A checkpoint is one file, ``<out>/checkpoint/state.npz``: a NumPy ``.npz`` (a zip, every member
CRC-checked on read) holding a JSON tree under ``__tree__`` in which each NumPy array is replaced
by a reference ``{"__ndarray__": "<member>"}`` to its own member. No pickles: loading a
checkpoint never runs code. The tree, written by :mod:`prunekit.app.job`, holds

* ``identity``: backend, model, algorithm, data set and every run setting that changes the
  result (:func:`run_fingerprint`), compared with the resuming run's before anything is loaded;
* ``position``: global step, phase, epoch and batch index within the epoch;
* ``model`` (weights and BN statistics by shared name), ``optimizer`` and ``rng`` (captured by
  the backend's ``capture_training_state`` and ``rng_state``), ``algorithm``
  (``Algorithm.state_dict()``) and ``run`` (accuracies so far, the measured trajectory, seconds
  spent).

Writes are atomic: the new checkpoint goes to a temporary file in the same folder, is flushed to
disk, the current one is hard-linked to ``previous.npz`` (the last good one, kept), and the new
one is renamed over ``state.npz``. A process killed at any moment leaves ``state.npz`` either
the old complete checkpoint or the new complete one; the temporary files it may leave
(:func:`temporary_name`) are removed by the next write.
"""
from __future__ import annotations

import json
import math
import os
import random
import zipfile
from typing import Any, Dict, Tuple

import numpy as np

from prunekit.errors import PlanError

FORMAT = "prunekit-checkpoint"
VERSION = 1
DIRNAME = "checkpoint"
FILENAME = "state.npz"
PREVIOUS = "previous.npz"
_TREE = "__tree__"
_ARRAY = "__ndarray__"
_PARTIAL = ".tmp-"

#: run settings that do not change what a run computes, so a resume may change them
NEUTRAL_SETTINGS = ("out", "progress", "resume", "checkpoint_every", "data_root", "device", "deterministic",
                    "distributed", "overwrite")


class CheckpointError(PlanError):
    """A checkpoint is missing, damaged, or belongs to another run."""


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, DIRNAME)


def checkpoint_path(out: str) -> str:
    return os.path.join(out, DIRNAME, FILENAME)


# ---------------------------------------------------------------------------- tree <-> npz
def flatten(tree: Any, arrays: Dict[str, np.ndarray], path: str = "") -> Any:
    """``tree`` as JSON-able data, its NumPy arrays moved into ``arrays`` (named by their path)."""
    if isinstance(tree, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = tree
        return {_ARRAY: key}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint state at {path or '/'}: key {k!r} is a {type(k).__name__}, "
                                "state_dict keys must be strings")
            if k == _ARRAY:
                raise TypeError(f"checkpoint state at {path or '/'}: key {_ARRAY!r} is reserved")
            out[k] = flatten(v, arrays, f"{path}/{k}")
        return out
    if isinstance(tree, (list, tuple)):
        return [flatten(v, arrays, f"{path}/{i}") for i, v in enumerate(tree)]
    if isinstance(tree, (bool, np.bool_)):
        return bool(tree)
    if isinstance(tree, (int, np.integer)):
        return int(tree)
    if isinstance(tree, (float, np.floating)):
        value = float(tree)
        if not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if tree is None or isinstance(tree, str):
        return tree
    raise TypeError(f"checkpoint state at {path or '/'}: a {type(tree).__name__} cannot be saved; "
                    "state_dict must hold dicts, lists, str, int, float, bool, None and NumPy arrays only")


def unflatten(tree: Any, arrays) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return arrays[tree[_ARRAY]]
        if set(tree) == {"__float__"}:
            return float(tree["__float__"])
        return {k: unflatten(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, arrays) for v in tree]
    return tree


def temporary_name(name: str, pid: int) -> str:
    """The temporary file in which process ``pid`` writes ``name`` before renaming it into place."""
    return f".{name}{_PARTIAL}{pid}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` in a checkpoint folder is a write in progress (or left by a killed one)."""
    return name.startswith(tuple(f".{n}{_PARTIAL}" for n in (FILENAME, PREVIOUS)))


def save_checkpoint(out: str, state: dict) -> str:
    """Write ``state`` (a tree, see :func:`flatten`) atomically to ``<out>/checkpoint/state.npz``."""
    folder = checkpoint_dir(out)
    os.makedirs(folder, exist_ok=True)
    arrays: Dict[str, np.ndarray] = {}
    tree = flatten({"format": FORMAT, "version": VERSION, **state}, arrays)
    arrays[_TREE] = np.array(json.dumps(tree))
    final = os.path.join(folder, FILENAME)
    tmp = os.path.join(folder, temporary_name(FILENAME, os.getpid()))
    for name in os.listdir(folder):  # left by a process killed while writing (never a valid checkpoint)
        if is_temporary(name):
            os.remove(os.path.join(folder, name))
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # keep the last good checkpoint beside the new one
            prev_tmp = os.path.join(folder, temporary_name(PREVIOUS, os.getpid()))
            os.link(final, prev_tmp)
            os.replace(prev_tmp, os.path.join(folder, PREVIOUS))
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # the renames themselves reach the disk
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return final


def read_checkpoint(path: str) -> dict:
    """The tree stored in one checkpoint file; :class:`CheckpointError` naming the damage."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if _TREE not in z.files:
                raise CheckpointError(f"checkpoint {path} is damaged or not a prunekit checkpoint: no {_TREE} entry")
            tree = json.loads(str(z[_TREE]))
            arrays = {k: z[k] for k in z.files if k != _TREE}  # reading every member checks its CRC
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError, json.JSONDecodeError,
            zipfile.LargeZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupted: {type(e).__name__}: {e}); "
                              f"refusing to resume from it") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunekit checkpoint")
    if tree.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {tree.get('version')}, this prunekit reads "
                              f"version {VERSION}")
    try:
        state = unflatten(tree, arrays)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} is damaged: array {e} is missing") from None
    for key in ("identity", "position", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} is damaged: it has no {key!r} section")
    return state


def load_checkpoint(out: str) -> dict:
    """The checkpoint of the run in ``out``; :class:`CheckpointError` if missing or damaged (the
    message names ``previous.npz`` when that older checkpoint is readable)."""
    path = checkpoint_path(out)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(out)} (expected {FILENAME}); "
                              "start the run without --resume")
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        prev = os.path.join(checkpoint_dir(out), PREVIOUS)
        hint = ""
        if os.path.exists(prev):
            try:
                step = read_checkpoint(prev)["position"]["step"]
                hint = f"; the previous checkpoint {prev} (step {step}) is readable: move it to {path} to resume from it"
            except CheckpointError:
                pass
        raise CheckpointError(f"{e}{hint}") from None


# ---------------------------------------------------------------------------- identity checks
def run_fingerprint(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings that change what a run computes (JSON-able), from a RunConfig's fields."""
    out = {}
    for k, v in sorted(settings.items()):
        if k in NEUTRAL_SETTINGS:
            continue
        out[k] = json.loads(json.dumps(v, default=repr))
    return out


def check_identity(saved: Dict[str, Any], current: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint from another backend, model, algorithm or configuration."""
    for key, what in (("backend", "backend"), ("model", "model"), ("algorithm", "algorithm"),
                      ("dataset", "data set")):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {path} is from another {what}: {saved.get(key)!r}, this run uses "
                                  f"{current.get(key)!r}; refusing to resume")
    a, b = saved.get("config", {}), current.get("config", {})
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    if diff:
        detail = ", ".join(f"{k}: {a.get(k, '<unset>')!r} in the checkpoint, {b.get(k, '<unset>')!r} now"
                           for k in diff[:6])
        raise CheckpointError(f"checkpoint {path} was written by a run with another configuration ({detail}); "
                              "refusing to resume")


def position_of(step: int, steps_per_epoch: int, dense_epochs: int) -> Tuple[str, int, int, int]:
    """(phase, step within the phase, epoch, batch index) after ``step`` global steps."""
    dense_steps = dense_epochs * steps_per_epoch
    phase = "dense" if step < dense_steps else "prune"
    epoch, batch = divmod(step, steps_per_epoch)
    return phase, (step if phase == "dense" else step - dense_steps), epoch, batch


def describe(state: dict) -> str:
    p = state.get("position", {})
    return f"step {p.get('step')} ({p.get('phase')} phase, epoch {p.get('epoch')}, batch {p.get('batch')})"


# ---------------------------------------------------------------------------- host generators
def host_rng_state() -> dict:
    """NumPy's global generator and Python's ``random`` (the framework's: the backend's
    ``rng_state``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": {"name": name, "keys": np.asarray(keys), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)},
            "python": {"version": int(version), "internal": np.asarray(internal, dtype=np.int64), "gauss": gauss}}


def set_host_rng_state(state: dict) -> None:
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached"])))
    random.setstate((int(p["version"]), tuple(int(v) for v in np.asarray(p["internal"])), p["gauss"]))
