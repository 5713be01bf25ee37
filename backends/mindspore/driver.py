"""Training-loop integration for MindSpore (PyNative and GRAPH_MODE).

:class:`PruningSession` fits around any ``nn.Optimizer`` in MindSpore's functional loop::

    grad_fn = mindspore.value_and_grad(forward_fn, None, optimizer.parameters)
    session = PruningSession(handle, algorithm, optimizer, total_steps)
    for x, y in loader:
        session.before_step()                          # schedules may update masks here
        loss, grads = grad_fn(x, y)
        grads = session.transform_gradients(grads)     # masks, regulariser terms
        if session.should_step():                      # False only where an algorithm skips a step
            optimizer(grads)
        session.after_optimizer_step()                 # re-apply masks, projections
    session.finish()

``grads`` is the tuple aligned with ``optimizer.parameters``. ``transform_gradients`` follows
the driver contract of :mod:`prunekit.algorithms.base`: it shows the unmasked gradients of the
prunable weights to ``observe_gradients`` when the algorithm asks, multiplies the gradients of
masked weights by their masks, then applies ``algorithm.transform_gradients`` (by layer name);
only those entries of the tuple are replaced. ``after_optimizer_step`` multiplies the masked
weights by their masks again (one compiled call for all of them) before ``algorithm.after_step``.
When a mask changes, the optimizer's state for the masked weights (``accum`` of ``nn.SGD``,
``moments`` of ``nn.Momentum``, ``moment1``/``moment2`` of ``nn.Adam`` and :class:`.optimizers.Adam`, any
state named ``<prefix>.<parameter name>`` except ``nn.SGD``'s ``stat`` flag) is masked too, so
pruned weights stay exactly zero.

Compiled steps (GRAPH_MODE ``Model.train``, a user's ``@mindspore.jit`` train step) call
``session.graph_update()`` inside the graph instead of ``transform_gradients`` +
``optimizer(grads)``: masks and terms are then Parameters of that Cell
(:class:`.fused.GraphUpdate`), which ``before_step`` / ``after_optimizer_step`` keep current.
For ``mindspore.train.Model`` see :mod:`.integrations` (``PruningTrainOneStepCell``,
``PruningCallback``, ``Pruner``). The life cycle itself is :class:`prunekit.app.session.SessionBase`'s.

:class:`Trainer` is the loop prunekit's own job uses, built on the same session, with the
forward+backward and the optimizer update each compiled once with ``mindspore.jit`` (ResNet-20,
batch 128, 2 CPU cores: 0.47 s a step against 1.28 s in PyNative) while the algorithm runs
eagerly in between.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.algorithms.base import Algorithm
from prunekit.app.session import SessionBase
from prunekit.decisions.schedules import LearningRateSchedule

from prunekit.errors import ConfigError

from .fused import FusedUpdate, GraphUpdate, assign_many, mul_all_
from .layers import MindSporeModelHandle, write_
from .ops import check_device
from .optimizers import make_optimizer

#: optimizer state that is a flag, not a moment: never masked
_STATE_FLAGS = ("stat",)


class PruningSession(SessionBase):
    """The session life cycle of :class:`prunekit.app.session.SessionBase` on the gradient tuple
    and the optimizer's state Parameters.

    Two ways to run a step. Eager (the functional loop above): ``transform_gradients`` and
    ``optimizer(grads)`` in Python. Compiled (``Model.train`` in GRAPH_MODE, a user's
    ``@mindspore.jit`` train step): after :meth:`graph_update` the gradient step is that Cell,
    called inside the user's graph; ``before_step`` / ``after_optimizer_step`` stay the eager calls
    around it and keep its masks and terms (Parameters) current. See :meth:`graph_update`."""

    _graph: Optional[GraphUpdate] = None

    def _attach_optimizer(self) -> None:
        position = {id(p): i for i, p in enumerate(self.optimizer.parameters)}
        self._grad_index = {n: position[id(w)] for n, w in self._weights.items() if id(w) in position}
        self._state = optimizer_state_by_layer(self.optimizer, self._weights)

    def transform_gradients(self, grads: Sequence[ms.Tensor]) -> Tuple[ms.Tensor, ...]:
        """The gradients to step with, as a tuple aligned with ``optimizer.parameters``."""
        if _compiling():  # MindSpore's graph parser accepts only built-in exception types here
            raise RuntimeError(
                "PruningSession.transform_gradients was called while MindSpore compiles a graph "
                "(GRAPH_MODE or @mindspore.jit): the masks would be compiled in as constants. Inside "
                "a compiled train step call session.graph_update()(grads) instead of "
                "transform_gradients + optimizer(grads); or run this loop in PyNative")
        if self._graph is not None:
            raise ConfigError("this session runs compiled steps (graph_update() was called): its "
                              "gradient step is the graph_update cell, not transform_gradients")
        if self.algorithm is None:
            return tuple(grads)
        named = self._transform({n: grads[i] for n, i in self._grad_index.items()})
        out = list(grads)
        for n, g in named.items():
            if n in self._grad_index:
                out[self._grad_index[n]] = g
        return tuple(out)

    def _mask_gradients(self, grads, masks):
        return {n: g * masks[n] if n in masks else g for n, g in grads.items()}

    def _mask_weights(self, weights, masks) -> None:
        mul_all_(weights, masks)

    def _mask_optimizer_state(self, layer, mask) -> None:
        for state in self._state.get(layer, ()):
            write_(state, state * mask)

    # ------------------------------------------------------------------ compiled steps
    def graph_update(self) -> GraphUpdate:
        """The gradient step as a Cell to call inside a compiled train step, ``update(grads)``
        with ``grads`` aligned with ``optimizer.parameters``: masks the gradients, adds the
        algorithm's terms, steps the optimizer and masks the weights, reading masks and terms
        from Parameters this session keeps current. Built once; from then on ``before_step`` and
        ``after_optimizer_step`` (still called eagerly around each compiled step) do the
        algorithm's eager work and write those Parameters. Refused, with the alternative, for
        an algorithm whose Python gradient transform a compiled step cannot run."""
        if self._graph is None:
            algo = self.algorithm
            kind = graph_support(algo)
            observe = kind == "reads" or (algo is not None and type(algo).needs_dense_gradients
                                          is not Algorithm.needs_dense_gradients)
            missing = [n for n in (algo.layers if algo is not None else ()) if n.name not in self._grad_index]
            if missing:
                raise ConfigError(f"layer {missing[0].name!r} is pruned but its weight is not among the "
                                  "optimizer's parameters: a compiled step could not mask its update")
            self._graph = GraphUpdate(self.optimizer, self._weights, terms=kind == "additive", observe=observe)
            self._graph_kind = kind
            self._skip_snapshot = self._observe_weights = None
            self._synced: tuple = ()
            self._nonzero_terms: set = set()
            self._ones = {}
            self._sync_graph_masks()
        return self._graph

    def before_step(self) -> None:
        super().before_step()
        if self._graph is None or self.algorithm is None:
            return
        algo, step = self.algorithm, self.step
        self._skip_snapshot = None if algo.should_step_optimizer(step) else _snapshot(_optimizer_params(self.optimizer))
        self._observe_weights = (_snapshot(self._graph.weights) if algo.needs_dense_gradients(step) else None)
        if self._graph_kind == "additive":
            terms = self.additive_terms()
            if terms is None:
                raise ConfigError(f"{algo.name}: this step's gradient transform is not additive, which a "
                                  "compiled step cannot apply; run the functional loop in PyNative")
            self._write_terms(terms)
        self._sync_graph_masks()

    def after_optimizer_step(self, weights_masked: bool = False) -> None:
        if self._graph is None or self.algorithm is None:
            return super().after_optimizer_step(weights_masked)
        algo, step, g = self.algorithm, self.step, self._graph
        restored = self._skip_snapshot is not None
        if restored:  # the algorithm skips this optimizer step: undo it
            _restore(self._skip_snapshot)
            self._skip_snapshot = None
        if self._observe_weights is not None:
            # the dense gradients were taken at the weights before the step: show them with those
            after = _snapshot(g.weights)
            _restore(self._observe_weights)
            algo.observe_gradients(step, {n: _copy(d) for n, d in zip(g.layers, g.dense)})
            _restore(after)
            self._observe_weights = None
        if self._graph_kind == "reads":
            algo.transform_gradients(step, dict(zip(g.layers, g.dense)))
        # the graph masked the weights after its optimizer step (unless that step was undone)
        super().after_optimizer_step(weights_masked=not restored)
        self._sync_graph_masks()

    def finish(self) -> None:
        super().finish()
        if self._graph is not None and self.algorithm is not None:
            self._sync_graph_masks()

    def _sync_graph_masks(self) -> None:
        """Write the algorithm's masks into the graph's mask Parameters when any changed."""
        masks = self.algorithm.masks if self.algorithm is not None else {}
        g = self._graph
        # the tensors themselves are kept (not their ids, which a freed tensor's successor may reuse)
        key = tuple(masks.get(n) for n in g.layers)
        if len(key) == len(self._synced) and all(a is b for a, b in zip(key, self._synced)):
            return
        values = []
        for n, p in zip(g.layers, g.masks):
            m = masks.get(n)
            if m is None:
                m = self._ones.get(n)
                if m is None:
                    m = self._ones[n] = msops.ones(tuple(p.shape), p.dtype)
            values.append(m)
        assign_many(list(g.masks), values)
        self._synced = key

    def _write_terms(self, terms) -> None:
        g = self._graph
        params = dict(zip(g.layers, g.terms))
        stale = self._nonzero_terms - set(terms)
        pairs = [(params[n], t) for n, t in terms.items() if n in params]
        pairs += [(params[n], msops.zeros(tuple(params[n].shape), params[n].dtype)) for n in stale]
        if pairs:
            assign_many([p for p, _ in pairs], [t for _, t in pairs])
        self._nonzero_terms = {n for n in terms if n in params}


def graph_support(algorithm) -> str:
    """How a compiled step runs ``algorithm``'s gradient transform: "none" (masks only),
    "additive" (:meth:`Algorithm.gradient_terms`: terms in Parameters), "reads" (the transform
    only reads the gradients, ``transform_reads_gradients_only``: called after the step on the
    dense gradients the graph copied out). Anything else is refused with a ConfigError."""
    if algorithm is None:
        return "none"
    cls = type(algorithm)
    if cls.transform_gradients is Algorithm.transform_gradients and "transform_gradients" not in vars(algorithm):
        return "none"
    if getattr(algorithm, "transform_reads_gradients_only", False):
        return "reads"
    if cls.gradient_terms is not Algorithm.gradient_terms and "transform_gradients" not in vars(algorithm):
        return "additive"
    raise ConfigError(f"algorithm {algorithm.name!r} changes the gradients in Python (transform_gradients), "
                      "which a compiled step (GRAPH_MODE Model.train, @mindspore.jit) cannot run; use the "
                      "functional loop (session.transform_gradients) in PyNative mode")


def _optimizer_params(optimizer) -> list:
    return [p for _, p in optimizer.parameters_and_names()]


def _copy(t) -> ms.Tensor:
    return ms.Tensor(t.asnumpy().copy())


def _snapshot(params) -> list:
    """(Parameter, copy of its value) pairs (host copies: taken on the rare steps that need them)."""
    return [(p, _copy(p)) for p in params]


def _restore(snapshot) -> None:
    for p, v in snapshot:
        write_(p, v)


def _compiling() -> bool:
    """True when called from Python that MindSpore runs while it compiles or interprets a graph."""
    frame = sys._getframe(1)
    while frame is not None:
        f = frame.f_code.co_filename.replace("\\", "/")
        if "/mindspore/" in f and "/_parse/" in f:
            return True
        frame = frame.f_back
    return False


def optimizer_state_by_layer(optimizer: nn.Optimizer, weights: Dict[str, ms.Parameter]) -> Dict[str, list]:
    """Per layer, the optimizer's state Parameters that belong to its weight.

    MindSpore optimizers clone their state from the parameters with ``ParameterTuple.clone``,
    which names each entry ``<prefix>.<parameter name>`` (``moments.conv1.weight``): a state
    entry belongs to a weight when its name minus the first component is the weight's name and
    its shape is the weight's.
    """
    by_name = {w.name: (layer, tuple(w.shape)) for layer, w in weights.items()}
    own = {id(p) for p in optimizer.parameters}
    out: Dict[str, list] = {}
    for name, p in optimizer.parameters_and_names():
        if id(p) in own or "." not in name:
            continue
        prefix, rest = name.split(".", 1)
        hit = by_name.get(rest)
        if hit is not None and prefix not in _STATE_FLAGS and tuple(p.shape) == hit[1]:
            out.setdefault(hit[0], []).append(p)
    return out


def set_learning_rate(optimizer: nn.Optimizer, lr: float) -> None:
    """Set a (single, static) optimizer learning rate in place; compiled steps read it at run time."""
    write_(optimizer.learning_rate, ms.Tensor(float(lr), optimizer.learning_rate.dtype))


# ---------------------------------------------------------------------------- Trainer
def _correct(logits, y):
    """Number of rows whose arg-max is the label (float32, traceable by ``mindspore.jit``)."""
    return msops.sum(msops.cast(msops.equal(msops.cast(msops.argmax(logits, 1), ms.int32), y), ms.float32))


class Trainer:
    """Cross-entropy training of a model with an optional pruning algorithm, fed NumPy batches."""

    session_class = PruningSession  # the data-parallel trainer substitutes its own

    def __init__(self, handle: MindSporeModelHandle, algorithm: Optional[Algorithm] = None, optimizer: str = "sgd",
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, total_steps: int = 1,
                 lr_schedule: str = "cosine", milestones: tuple = (), device: Optional[str] = None,
                 jit: bool = True):
        check_device(device)
        self.handle = handle
        self.model = handle.model
        self.optimizer = make_optimizer(self.model, optimizer, lr, momentum, weight_decay)
        self.lr = LearningRateSchedule(lr, total_steps, lr_schedule, tuple(milestones))
        self.session = self.session_class(handle, algorithm, self.optimizer, total_steps)
        self._lr_now = float(lr)
        model, opt = self.model, self.optimizer

        def loss_fn(x, y):  # the second output (correct predictions) is an aux: no gradient
            logits = model(x)
            correct = _correct(logits, y)
            return msops.cross_entropy(logits, y), msops.stop_gradient(correct)

        def apply_fn(grads):
            return opt(grads)

        def eval_fn(x, y):
            logits = model(x)
            loss = msops.cross_entropy(logits, y, reduction="sum")
            correct = _correct(logits, y)
            return loss, correct

        # Separate compiled functions for train and eval: each is only ever run in its own mode.
        grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters, has_aux=True)
        self._grad = ms.jit(grad_fn) if jit else grad_fn
        self._apply = ms.jit(apply_fn) if jit else apply_fn
        self._eval = ms.jit(eval_fn) if jit else eval_fn
        # masking, additive algorithm terms and the optimizer in one compiled call (see fused.py)
        self._fused = FusedUpdate(self.session, opt) if jit else None

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray) -> Tuple[ms.Tensor, ms.Tensor]:
        return (ms.Tensor(np.ascontiguousarray(x, dtype=np.float32)),
                ms.Tensor(np.ascontiguousarray(y).astype(np.int32, copy=False)))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> ms.Tensor:
        """One optimizer step; returns the loss as a 0-d tensor (no host sync)."""
        lr = self.lr.lr_at(self.session.step)
        if lr != self._lr_now:
            set_learning_rate(self.optimizer, lr)
            self._lr_now = lr
        if not self.model.training:
            self.model.set_train(True)
        xb, yb = self._tensors(x, y)
        self.session.before_step()
        (loss, correct), grads = self._grad(xb, yb)
        fused = self._fused is not None and self._fused(grads)
        if not fused:
            grads = self.session.transform_gradients(grads)
            if self.session.should_step():
                # mutable: a plain tuple of tensors would be compiled in as constants (recompiling each step)
                self._apply(ms.mutable(tuple(grads)))
        self.session.finite.note_loss(loss)  # checked with the weights at the step's end
        self.session.after_optimizer_step(weights_masked=fused)
        #: correct predictions in the batch just trained on, a 0-d tensor (no host sync)
        self.last_correct = correct
        return loss

    def evaluate(self, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float]:
        """Mean loss and accuracy over NumPy batches, in eval mode."""
        self.model.set_train(False)
        total, correct, loss_sum = 0, 0.0, 0.0
        for x, y in batches:
            xb, yb = self._tensors(x, y)
            loss, hits = self._eval(xb, yb)
            loss_sum += float(loss.asnumpy())
            correct += float(hits.asnumpy())
            total += int(np.shape(y)[0])
        return loss_sum / max(1, total), int(round(correct)) / max(1, total)

    def finish(self) -> None:
        self.session.finish()
