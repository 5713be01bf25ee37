"""The contract between an algorithm and a backend's training driver.

A driver calls, for every optimizer step ``t`` (0-based, counted over the whole run):

1. ``before_step(t)``: the algorithm may recompute masks (schedules) and apply them to the
   weights. If it changed any mask it sets ``masks_changed``; the driver then masks the
   optimizer's state (momentum, Adam moments) with the new masks and clears the flag.
2. forward and backward; if ``needs_dense_gradients(t)``, the driver first passes the
   unmasked gradients to ``observe_gradients(t, grads)``; then it multiplies the gradients of masked weights by their
   masks (in place, with the framework's fused ops: masking is the driver's hot path).
3. ``transform_gradients(t, grads)``: the algorithm's own gradient terms (regularisers), on
   the gradients of the prunable weights by layer name; returns the dict (may modify it).
4. the framework's optimizer steps, unless ``should_step_optimizer(t)`` is False.
5. the driver multiplies the masked weights by their masks again, so pruned weights stay
   exactly zero whatever weight decay and momentum do; then ``after_step(t)`` for the
   algorithm's own post-step work (projections, thresholds).

The algorithm only sees :class:`~prunekit.contract.ops.Ops` and :class:`~prunekit.contract.handle.ModelHandle`.

Checkpoints (resume after a crash)
----------------------------------
``prunekit run`` checkpoints between two optimizer steps and resumes a run so that it finishes
with the masks, ranks and weights of an uninterrupted run. The job saves the model's weights
and BN statistics, the optimizer state, the random states and the step itself; the algorithm
saves *everything else it carries from one step to the next* in :meth:`Algorithm.state_dict`
and takes it back in :meth:`Algorithm.load_state_dict`. That is the whole interface: an
algorithm implements these two methods and nothing else.

* ``state_dict()`` returns a tree of dicts (string keys), lists, ``str``, ``int``, ``float``,
  ``bool``, ``None`` and NumPy arrays — never framework tensors (convert them with
  :func:`tensors_to_numpy` / ``self.ops.to_numpy``). Subclasses call ``super().state_dict()``
  and add their own keys; the base saves the masks, the optimizer-state masks and the
  mask-changed flag.
* ``load_state_dict(state)`` is called on a fresh instance built with the same config and bound
  (:meth:`bind`) to the same model, whose weights have already been restored. Call
  ``super().load_state_dict(state)`` first; convert arrays back with :func:`tensors_from_numpy`.
  Raise :class:`~prunekit.errors.PlanError` naming the problem when the state does not fit.
* Include what is computed from the run so far and used later: schedule position if it is not a
  function of the step, current target, ranks, scores gathered for a later mask update (RPG's
  dense gradients), pending gradient terms, warm-start bases (``SpectrumEngine.state_dict``),
  counters, any random generator the algorithm owns (``np.random.Generator.bit_generator.state``).
  What :meth:`bind` derives from the config and the model (layers, schedules) need not be saved.

Job-facing hooks
----------------
What ``prunekit run`` reads from an algorithm is listed in :class:`Algorithm`'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import numpy as np

from prunekit.contract.handle import ModelHandle
from prunekit.contract.layers import require_prunable, signature
from prunekit.contract.ops import Tensor
from prunekit.contract.reference_models import MODELS
from prunekit.decisions.plan import PruningPlan
from prunekit.errors import ModelError, PlanError


@dataclass
class FinalTransform:
    """A model an algorithm rebuilt from the trained one (:meth:`Algorithm.final_transform`)."""

    name: str             # report section, and the accuracy key "after_<name>"
    handle: ModelHandle   # the new model, evaluated and reported by the job
    section: dict         # what the report records under ``name``


class Algorithm:
    """A pruning algorithm: the driver contract (this module's docstring) and the job-facing hooks.

    Job-facing hooks: ``prunekit run`` (:mod:`prunekit.app.job`) knows no algorithm by name; it
    reads only these members, each with a default here that an algorithm overrides where it
    needs to.

    * ``name`` and ``config_class``: the registry key and the dataclass of settings
      (:func:`~prunekit.algorithms.registry.register_algorithm`, ``make_algorithm(name, **settings)``).
    * ``prunes_at_init`` (False): True for an algorithm that decides on the untrained model; the
      job then skips dense training, calls :meth:`prepare` with :attr:`scoring_batches` (1)
      training batches, trains the model it returns with :meth:`training_algorithm` (``self``)
      and records :meth:`describe` (``{}``).
    * :attr:`held_out_fraction` (None): the share of the training set the job splits off; it then
      assigns an endless iterator of held-out ``(x, y)`` batches to ``validation`` (None).
    * :meth:`trainer_overrides` (``{}``): pruning-phase optimizer settings the algorithm assumes
      (``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``lr_schedule``), over the run's.
    * ``channel_keep`` (``{}``): after :meth:`finish`, kept channel indices per channel group; when
      not empty (and the algorithm did not prune at initialization) the job builds the narrower
      dense model (``backend.compact``) and reports it.
    * :meth:`final_transform` (None): a model rebuilt after training (e.g. a low-rank
      decomposition), as a :class:`FinalTransform` the job evaluates and reports.
    * ``ranks`` (None): per-layer ranks for the report.
    * :attr:`target_sparsity` (None): the sparsity the algorithm aims at, shown beside the
      measured one.
    """

    #: registry key (``make_algorithm(name)``); set by every registered subclass
    name = "base"
    #: the dataclass of this algorithm's settings
    config_class: Optional[type] = None
    #: True: decides on the untrained model (see "Job-facing hooks" in this module's docstring)
    prunes_at_init = False
    #: True where :meth:`transform_gradients` only reads the gradients and returns them unchanged
    #: (a driver that compiles the step may then call it after the step on a copy of them)
    transform_reads_gradients_only = False

    def __init__(self):
        self.config: Any = None
        #: kept channel indices per channel group, filled by channel-pruning algorithms
        self.channel_keep: Dict[str, Any] = {}
        #: per-layer ranks for the report (rank-based algorithms); None: none
        self.ranks: Optional[Dict[str, int]] = None
        #: held-out ``(x, y)`` batches, given by the job when :attr:`held_out_fraction` is set
        self.validation: Optional[Iterable] = None
        self.handle: Optional[ModelHandle] = None
        self.ops = None
        self.layers = []
        self.total_steps = 0
        self.masks: Dict[str, Tensor] = {}
        self.masks_changed = False
        #: what the driver multiplies the optimizer state by on a mask change (None: the masks)
        self.state_masks: Optional[Dict[str, Tensor]] = None

    # ------------------------------------------------------------------ lifecycle
    def bind(self, handle: ModelHandle, total_steps: int) -> "Algorithm":
        self.handle = handle
        self.ops = handle.ops
        self.layers = require_prunable(self.select_layers(handle.layers), handle.model_name)
        self.total_steps = int(total_steps)
        check_finite_weights(handle, self.layers)
        return self

    def select_layers(self, layers):
        """The layers this algorithm prunes (default: every prunable layer)."""
        return list(layers)

    def before_step(self, step: int) -> None:
        pass

    def needs_dense_gradients(self, step: int) -> bool:
        """True if the driver should call :meth:`observe_gradients` at this step."""
        return False

    def observe_gradients(self, step: int, grads: Dict[str, Tensor]) -> None:
        """The unmasked gradients of the prunable weights (e.g. RigL regrowth scores)."""

    def should_step_optimizer(self, step: int) -> bool:
        """False where the algorithm wants this step's optimizer update skipped."""
        return True

    def transform_gradients(self, step: int, grads: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return grads

    def gradient_terms(self, step: int) -> Optional[Dict[str, Tensor]]:
        """Optional fast path for drivers that fuse step 3 into a compiled update. If this step's
        :meth:`transform_gradients` only adds a term to some gradients, each term masked like its
        gradient (``g·mask + term·mask``), return those terms by layer name (consuming them, as
        ``transform_gradients`` would) and the driver applies ``(g + term)·mask`` itself instead
        of calling ``transform_gradients``; ``{}`` if nothing is added this step. None (the
        default): the driver must call :meth:`transform_gradients`."""
        return None

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        """Called once after the last step (final decisions, e.g. hard masks)."""

    # ------------------------------------------------------------------ job-facing hooks
    @property
    def scoring_batches(self) -> int:
        """Training batches :meth:`prepare` scores on (``prunes_at_init`` algorithms)."""
        return 1

    def prepare(self, handle: ModelHandle, backend, batches: Iterable = (), seed: int = 0) -> ModelHandle:
        """``prunes_at_init``: decide on the untrained ``handle`` and return the model to train."""
        return handle

    def training_algorithm(self) -> Optional["Algorithm"]:
        """The algorithm the training driver runs (None: train the model as it is)."""
        return self

    @property
    def held_out_fraction(self) -> Optional[float]:
        """Share of the training set held out for ``validation`` (None: none)."""
        return None

    def trainer_overrides(self) -> Dict[str, Any]:
        """Optimizer settings of the pruning phase that replace the run's (empty: none)."""
        return {}

    def final_transform(self, handle: ModelHandle, backend, threshold: float) -> Optional[FinalTransform]:
        """A model rebuilt from the trained ``handle`` after :meth:`finish`, or None (the default).
        ``threshold`` is the run's ``decompose_threshold`` (``--decompose-threshold``), None when the
        run leaves it to the algorithm's own setting."""
        return None

    @property
    def target_sparsity(self) -> Optional[float]:
        """The fraction of prunable weights the algorithm sets to zero (None: no such target)."""
        return None

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: Dict[str, Tensor], state_masks: Optional[Dict[str, Tensor]] = None) -> None:
        """New masks, applied to the weights now. ``state_masks`` (default: the masks) is what the
        driver multiplies the optimizer state by, e.g. to also clear the momentum of regrown weights."""
        self.masks = dict(masks)
        self.state_masks = dict(state_masks) if state_masks is not None else None
        self.masks_changed = True
        self.apply_masks()

    def optimizer_state_masks(self) -> Dict[str, Tensor]:
        return self.state_masks if self.state_masks is not None else self.masks

    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.handle.mul_weight_(name, mask)

    # ------------------------------------------------------------------ output
    def plan(self) -> PruningPlan:
        return PruningPlan(
            model=self.handle.model_name,
            algorithm=self.name,
            backend=self.ops.name,
            layer_signature=signature(self.handle.layers),
            masks={n: self.ops.to_numpy(m) > 0.5 for n, m in self.masks.items()},
            # channel-pruning algorithms: kept channels per group (compaction replays them)
            kept_channels={k: [int(i) for i in v] for k, v in self.channel_keep.items()},
            meta=self.describe(),
        )

    def describe(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Pruning state for checkpoints, as NumPy (see "Checkpoints" in this module's docstring)."""
        state = {"masks": tensors_to_numpy(self.ops, self.masks), "masks_changed": bool(self.masks_changed),
                 "total_steps": int(self.total_steps)}
        if self.state_masks is not None:
            state["state_masks"] = tensors_to_numpy(self.ops, self.state_masks)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output on an instance bound to the same model and config."""
        if not isinstance(state, dict) or "masks" not in state:
            raise PlanError(f"{self.name} state has no masks: not a state saved by Algorithm.state_dict")
        saved_steps = state.get("total_steps")
        if saved_steps is not None and int(saved_steps) != int(self.total_steps):
            raise PlanError(f"{self.name} state was saved for a run of {saved_steps} steps, this one has "
                            f"{self.total_steps}")
        masks = self._masks_from_numpy(state["masks"], "masks")
        state_masks = state.get("state_masks")
        self.set_masks(masks, self._masks_from_numpy(state_masks, "state_masks") if state_masks is not None else None)
        self.masks_changed = bool(state.get("masks_changed", True))

    def _masks_from_numpy(self, arrays: dict, what: str) -> Dict[str, Tensor]:
        shapes = {l.name: tuple(l.weight_shape) for l in self.handle.layers}
        for n, m in arrays.items():
            if n not in shapes:
                raise PlanError(f"{self.name} state has {what} for layer {n!r}, which model "
                                f"{self.handle.model_name!r} does not have")
            if tuple(np.shape(m)) != shapes[n]:
                raise PlanError(f"{self.name} state has {what} of shape {tuple(np.shape(m))} for layer {n!r}, "
                                f"whose weight is {shapes[n]}")
        return {n: self.ops.asarray(np.asarray(m, dtype=np.float32), like=self.handle.weight(n))
                for n, m in arrays.items()}


def tensors_to_numpy(ops, tensors: Optional[Dict[str, Tensor]]) -> Optional[Dict[str, np.ndarray]]:
    """``{name: tensor}`` as ``{name: NumPy array}`` (None stays None), for ``state_dict``."""
    if tensors is None:
        return None
    return {n: np.asarray(ops.to_numpy(t)) for n, t in tensors.items()}


def tensors_from_numpy(ops, arrays: Optional[Dict[str, np.ndarray]], like) -> Optional[Dict[str, Tensor]]:
    """Inverse of :func:`tensors_to_numpy`: backend tensors beside ``like`` (a tensor, or a
    function from name to tensor, e.g. ``handle.weight``), keeping each array's dtype."""
    if arrays is None:
        return None
    ref = like if callable(like) else (lambda _n: like)
    return {n: ops.asarray(np.asarray(a), dtype=np.asarray(a).dtype.name, like=ref(n)) for n, a in arrays.items()}


def check_finite_weights(handle: ModelHandle, layers) -> None:
    """Refuse to prune a model whose prunable weights hold NaN or Inf."""
    ops = handle.ops
    for layer in layers:
        w = handle.weight(layer.name)
        bad = ops.size(w) - int(round(ops.item(ops.sum(ops.cast(ops.isfinite(w), "float32")))))
        if bad:
            raise ModelError(f"layer {layer.name!r} has {bad} NaN or Inf weight value(s); refusing to prune")


def apply_plan(handle: ModelHandle, plan: PruningPlan) -> Dict[str, Tensor]:
    """Replay a plan's masks onto a model (checked first; nothing changes on a mismatch). A plan of a
    model named by a source or factory (``source:name``, see the job's ``--model``) applies on its
    own backend only: the reference models are the twins that replay across backends."""
    own = getattr(handle, "backend", "")
    # a model of a collection or a factory (``source:name``) exists on its own backend only
    if plan.backend and own and plan.backend != own and ":" in plan.model:
        raise PlanError(f"plan was made for model {plan.model!r} on backend {plan.backend!r}; only the reference "
                        f"models ({', '.join(MODELS)}) replay across backends, so it applies on {plan.backend!r} "
                        f"only, not on {own!r}")
    plan.check_matches(handle.layers, handle.model_name)
    check_finite_weights(handle, handle.layers)
    ops = handle.ops
    masks = {}
    for name, m in plan.masks.items():
        masks[name] = ops.asarray(m.astype(np.float32), like=handle.weight(name))
    for name, m in masks.items():
        handle.mul_weight_(name, m)
    return masks
