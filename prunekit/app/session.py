"""The pruning session's life cycle, written once for every backend.

A session carries an algorithm through a training loop in the order of the driver contract
(:mod:`prunekit.algorithms.base`): ``before_step``, the gradient transform (dense gradients
observed, gradients masked, the algorithm's terms), the optimizer step unless
``should_step()`` is False, ``after_optimizer_step`` (weights masked again, the algorithm's
post-step work), ``finish``. :class:`SessionBase` does all of it by layer name; a backend's
``driver.PruningSession`` adds only the tensor work, as small methods:

* :meth:`SessionBase._mask_gradients` / :meth:`SessionBase._mask_weights`: multiply by the masks;
* :meth:`SessionBase._mask_optimizer_state`: mask the optimizer's state of one weight;
* :meth:`SessionBase._dense_copy`: the gradients as the algorithm may keep them;
* optionally :meth:`SessionBase._add_terms` (``adds_terms = True``): an additive algorithm's
  terms added in place, instead of the generic ``transform_gradients``;

and its public gradient hook in the framework's terms (``after_backward`` on the weights' own
gradients, or ``transform_gradients`` on a tuple aligned with the optimizer's parameters), built
on :meth:`SessionBase._transform`.

:class:`DataParallelSession` is the data-parallel part shared by the backends'
``distributed.DistributedSession``; :func:`optimizer_key` checks the optimizer names of the
backends' ``optimizers.make_optimizer``. Nothing here imports a framework.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from prunekit.app.distributed import ConsistencyGuard, average_running_stats, broadcast_state, world
from prunekit.app.divergence import FiniteGuard
from prunekit.errors import ConfigError

#: the optimizers every backend's ``optimizers.make_optimizer`` builds, with the same semantics on each
OPTIMIZERS = ("sgd", "adam")


def optimizer_key(name: str) -> str:
    """``name`` as a key of :data:`OPTIMIZERS` (any case); anything else is refused."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return key


class SessionBase:
    """Runs ``algorithm`` (None: plain training) on ``handle`` around ``optimizer``."""

    #: the backend adds additive gradient terms itself (:meth:`_add_terms`)
    adds_terms = False

    def __init__(self, handle, algorithm, optimizer, total_steps: int):
        self.handle = handle
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.step = 0
        self._weights = {l.name: handle.module(l.name).weight for l in handle.layers}
        self._masks_seen = None  # the algorithm's masks dict the lists below were built from
        self._masked: Tuple[list, list] = ([], [])
        #: the end-of-step NaN/Inf check (prunekit.app.divergence); the trainer notes its loss
        self.finite = FiniteGuard(handle, self._weights)
        self._attach_optimizer()
        if algorithm is not None:
            algorithm.bind(handle, total_steps)

    # ------------------------------------------------------------------ framework parts
    def _attach_optimizer(self) -> None:
        """Find what the session needs of the optimizer (called before the algorithm is bound)."""

    def _dense_copy(self, grads: Dict[str, object]) -> Dict[str, object]:
        """The unmasked gradients handed to ``observe_gradients`` (a copy where masking is in place)."""
        return dict(grads)

    def _mask_gradients(self, grads: Dict[str, object], masks: Dict[str, object]) -> Dict[str, object]:
        """The gradients multiplied by the masks of the masked layers (in place or new)."""
        raise NotImplementedError

    def _add_terms(self, grads: Dict[str, object], terms: Dict[str, object]) -> Dict[str, object]:
        """``grads`` (already masked) plus each term, masked like its gradient (``adds_terms``)."""
        raise NotImplementedError

    def _mask_weights(self, weights: List[object], masks: List[object]) -> None:
        """``w *= m`` for every pair, in place."""
        raise NotImplementedError

    def _mask_optimizer_state(self, layer: str, mask) -> None:
        """Multiply the optimizer's state of ``layer``'s weight (momentum, moments) by ``mask``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the life cycle
    def before_step(self) -> None:
        self.finite.refuse_if_failed()  # never decide from the NaN/Inf weights of a diverged step
        if self.algorithm is None:
            return
        self.algorithm.before_step(self.step)
        self._sync_optimizer_state()

    def _transform(self, grads: Dict[str, object]) -> Dict[str, object]:
        """Steps 2 and 3 of the driver contract on the gradients of the prunable weights, by
        layer name; returns the gradients to step with (entries may be the given tensors)."""
        algo, step = self.algorithm, self.step
        if algo.needs_dense_gradients(step):
            dense = self._dense_copy(grads)
            self.finite.note_gradients(dense)  # checked before any decision can use them
            algo.observe_gradients(step, dense)
        grads = self._mask_gradients(grads, algo.masks)
        if self.adds_terms:
            terms = self.additive_terms()
            if terms is not None:
                return self._add_terms(grads, terms)
        return algo.transform_gradients(step, dict(grads))

    def additive_terms(self) -> Optional[Dict[str, object]]:
        """This step's additive gradient terms (:meth:`Algorithm.gradient_terms`, consumed), or
        None where the generic ``transform_gradients`` must run. A transform replaced on the
        instance (e.g. a test spy) keeps the generic path."""
        if "transform_gradients" in vars(self.algorithm):
            return None
        return self.algorithm.gradient_terms(self.step)

    def should_step(self) -> bool:
        """Whether to step the optimizer this step (RPG's release semantics skips some)."""
        return self.algorithm is None or self.algorithm.should_step_optimizer(self.step)

    def _masked_weights(self) -> Tuple[list, list]:
        """The masked weights and their masks, as parallel lists (rebuilt when the masks dict is)."""
        masks = self.algorithm.masks
        if masks is not self._masks_seen:
            self._masked = ([self._weights[n] for n in masks], list(masks.values()))
            self._masks_seen = masks
        return self._masked

    def after_optimizer_step(self, weights_masked: bool = False) -> None:
        """``weights_masked``: the caller has already multiplied the masked weights by their
        masks after the optimizer step (a fused update that does it in-graph)."""
        if self.algorithm is not None:
            weights, masks = self._masked_weights()
            if weights and not weights_masked:
                self._mask_weights(weights, masks)
        self.finite.check(self.step)  # raises DivergenceError before after_step can decide from NaN/Inf
        if self.algorithm is not None:
            self.algorithm.after_step(self.step)
            self._sync_optimizer_state()
        self.step += 1

    def finish(self) -> None:
        self.finite.refuse_if_failed()
        if self.algorithm is not None:
            self.algorithm.finish()
            self._sync_optimizer_state()

    def _sync_optimizer_state(self) -> None:
        """After a mask change, zero momentum / Adam moments of pruned weights."""
        if not self.algorithm.masks_changed:
            return
        for name, mask in self.algorithm.optimizer_state_masks().items():
            self._mask_optimizer_state(name, mask)
        self.algorithm.masks_changed = False

    def state_dict(self) -> dict:
        """The step counter and the algorithm's state (NumPy), for checkpoints; :meth:`load_state_dict`
        restores it on a session over the same model, algorithm and config."""
        return {"step": self.step, "algorithm": self.algorithm.state_dict() if self.algorithm else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output: the step counter, then the algorithm's state
        (its masks are applied to the weights and the optimizer's state at once, so the model
        is masked as it was when saved). Checked before anything is changed."""
        if not isinstance(state, dict) or "step" not in state or "algorithm" not in state:
            raise ConfigError("session state must be a dict with 'step' and 'algorithm' (from state_dict()), "
                              f"got {type(state).__name__} with keys {sorted(state) if isinstance(state, dict) else []}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"session state 'step' must be a non-negative int, got {step!r}")
        saved = state["algorithm"]
        if (saved is None) != (self.algorithm is None):
            raise ConfigError("session state was saved " + ("without" if saved is None else "with")
                              + " an algorithm, this session has " + ("one" if self.algorithm is not None else "none"))
        if self.algorithm is not None:
            self.algorithm.load_state_dict(saved)
            self.algorithm.masks_changed = True
            weights, masks = self._masked_weights()
            if weights:
                self._mask_weights(weights, masks)
            self._sync_optimizer_state()
        self.step = step


class DataParallelSession(SessionBase):
    """A session for data-parallel runs (mixed in before the backend's session): every rank
    starts from rank 0's weights, the :class:`~prunekit.app.distributed.ConsistencyGuard` keeps
    the masks identical, and the BatchNorm running statistics are averaged over ranks at the end.
    Averaging the gradients is the backend's part."""

    def __init__(self, handle, algorithm, optimizer, total_steps: int, on_mismatch: str = "adopt"):
        self.comm = world()
        broadcast_state(self.comm, handle)
        super().__init__(handle, algorithm, optimizer, total_steps)
        self.guard = ConsistencyGuard(self.comm, algorithm, on_mismatch)

    def before_step(self) -> None:
        super().before_step()
        if self.guard.check():
            self._sync_optimizer_state()

    def finish(self) -> None:
        super().finish()
        if self.guard.check():
            self._sync_optimizer_state()
        average_running_stats(self.comm, self.handle)
        self.guard.check_final(self.handle)
