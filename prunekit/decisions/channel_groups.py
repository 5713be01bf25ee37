"""Channel dependency groups, found from the model itself (issue #4).

A *channel group* is a set of channels that must be pruned together: the output channels of
every conv/linear layer whose outputs meet (a residual addition), the BatchNorms over them, the
depthwise convs that carry them through, and the input channels of every layer that reads them.
:func:`find_channel_groups` finds them from the model, not from a table of layer names, with one
implementation for every backend; a backend only provides the probe below (its framework-free
part is :func:`run_probe`).

The probe (one eval-mode forward per chunk of rows, the backend's ``probe_channels``):

* every conv/linear layer's output is replaced by zeros, so no signal crosses a layer that mixes
  channels; every BatchNorm is replaced by the identity (it is per-channel by definition, and its
  scale could be zero or negative and hide the signal);
* for a producer ``P`` with ``C`` output channels, row ``2b+1`` adds 1.0 to the channels whose
  index has bit ``b`` set and row ``2b+2`` to those whose bit ``b`` is clear (``ceil(log2 C)``
  bit pairs); row 0 of each forward is left unperturbed (the reference);
* the input of every conv/linear/BatchNorm (and the model's output) is recorded: a channel (or,
  after a flatten, a feature) *changed* in a row when it differs from row 0 anywhere.

A consumer column that changed in exactly one row of every bit pair is fed one-to-one by the
producer channel whose index the pattern spells. A consumer fed by ``P`` so that column ``c``
reads channel ``c`` (or a linear layer whose columns come in blocks of ``s`` per channel, a
flatten) shares ``P``'s channel space; anything else (an offset, a permutation, a partial or
mixed feed: zero-padding shortcuts, concatenations, channel shuffles) *couples* the two spaces
without making them one, and both become not prunable. A depthwise conv's input and output are
one space; a grouped conv's (not depthwise) input and output spaces are not prunable. Spaces
joined by a union-find form the groups; a group reaching the model's output (logits) or fed by
the image is not prunable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from prunekit.contract.backend import backend_of
from prunekit.errors import ModelError

#: the key under which a backend probe reports the model's output
OUTPUT = "<output>"
#: name of the group of the image channels (it has no producer)
INPUT_GROUP = "<input>"
#: most rows one probe forward carries (rows of several producers share a forward)
MAX_ROWS = 192


@dataclass(frozen=True)
class ChannelGroup:
    name: str                   # the first producer's layer name in model layer order, e.g. "conv1"
    size: int                   # number of channels
    producers: Tuple[str, ...]  # conv/linear (non-depthwise) whose OUTPUT channels are these channels
    consumers: Tuple[str, ...]  # conv/linear (non-depthwise) whose INPUT channels are these channels
    norms: Tuple[str, ...]      # BatchNorm modules over these channels
    depthwise: Tuple[str, ...]  # depthwise convs whose input AND output channels are these channels
    prunable: bool              # False when the channels are the model's input or output, or coupled
    spatial: Dict[str, int] = field(default_factory=dict)  # consumer -> columns per channel

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "producers": list(self.producers),
                "consumers": list(self.consumers), "norms": list(self.norms), "depthwise": list(self.depthwise),
                "prunable": self.prunable, "spatial": dict(self.spatial)}


def _bits(n: int) -> int:
    return max(1, int(np.ceil(np.log2(max(n, 2)))))


def binary_codes(n: int) -> np.ndarray:
    """Rows of the perturbation for ``n`` channels: 2 rows per index bit (bit set, bit clear)."""
    idx = np.arange(n)
    rows = []
    for b in range(_bits(n)):
        bit = (idx >> b) & 1
        rows.append(bit == 1)
        rows.append(bit == 0)
    return np.stack(rows).astype(np.float32)


def decode(changed: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """From a probe's ``changed`` (2*bits, width) booleans: for each column the producer channel
    feeding it one-to-one (-1 where none), and whether each column was fed at all."""
    ones, zeros = changed[0::2], changed[1::2]
    fed = changed.any(axis=0)
    unique = np.all(ones ^ zeros, axis=0)
    weights = (1 << np.arange(ones.shape[0]))[:, None]
    index = np.where(unique, (ones * weights).sum(axis=0), -1)
    index = np.where(index < n, index, -1)
    return index.astype(np.int64), fed


def classify(index: np.ndarray, fed: np.ndarray, n: int, is_linear: bool) -> Tuple[str, int]:
    """How a consumer reads a producer's ``n`` channels: ("none", 0), ("same", columns per channel)
    or ("coupled", 0)."""
    if not fed.any():
        return "none", 0
    width = index.shape[0]
    if width == n and np.array_equal(index, np.arange(n)):
        return "same", 1
    if is_linear and width % n == 0 and width > n:
        s = width // n
        if np.array_equal(index, np.arange(width) // s):
            return "same", s
    return "coupled", 0


class _UnionFind:
    def __init__(self):
        self.parent: Dict[str, str] = {}

    def add(self, a: str) -> None:
        self.parent.setdefault(a, a)

    def find(self, a: str) -> str:
        self.add(a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _run_rows(probe, blocks: List[Tuple[Dict[Optional[str], np.ndarray], object]]):
    """Run row blocks (each ``{producer: codes}``, all codes of a block the same height, all
    producers of a block sharing its rows) through the probe, several blocks per forward;
    yields ``(key, {consumer: changed rows})`` per block."""
    out = []
    chunk, rows = [], 1

    def flush():
        nonlocal chunk, rows
        if not chunk:
            return
        perturb, spans, start = {}, [], 1
        for codes_by, key in chunk:
            height = next(iter(codes_by.values())).shape[0]
            for name, codes in codes_by.items():
                perturb[name] = (start, codes)
            spans.append((key, start, height))
            start += height
        changed = probe(perturb, start)
        for key, s, k in spans:
            out.append((key, {c: np.asarray(v[s:s + k], bool) for c, v in changed.items()}))
        chunk, rows = [], 1

    for codes_by, key in blocks:
        height = next(iter(codes_by.values())).shape[0]
        if rows + height > MAX_ROWS and chunk:
            flush()
        chunk.append((codes_by, key))
        rows += height
    flush()
    return out


def _probe_all(probe, producers: List[Tuple[Optional[str], int]]) -> Dict[Optional[str], Dict[str, np.ndarray]]:
    """Per producer (None: the image), ``{consumer: changed}`` over its binary-code rows.

    Two stages keep the forward passes few: first one row per producer, all its channels
    perturbed, which tells which consumers each producer reaches; then producers that reach no
    common consumer share the rows of their binary codes (a greedy colouring in layer order)."""
    reach: Dict[Optional[str], set] = {}
    for key, changed in _run_rows(probe, [({name: np.ones((1, n), np.float32)}, name) for name, n in producers]):
        reach[key] = {c for c, v in changed.items() if v.any()}
    colours: List[List[Tuple[Optional[str], int]]] = []
    seen_by: List[set] = []
    for name, n in producers:
        for members, used in zip(colours, seen_by):
            if not (reach[name] & used):
                members.append((name, n))
                used |= reach[name]
                break
        else:
            colours.append([(name, n)])
            seen_by.append(set(reach[name]))
    blocks = []
    for i, members in enumerate(colours):
        height = 2 * max(_bits(n) for _, n in members)
        codes_by = {}
        for name, n in members:
            codes = np.zeros((height, n), np.float32)
            codes[:2 * _bits(n)] = binary_codes(n)
            codes_by[name] = codes
        blocks.append((codes_by, i))
    results: Dict[Optional[str], Dict[str, np.ndarray]] = {}
    for i, changed in _run_rows(probe, blocks):
        for name, n in colours[i]:
            results[name] = {c: v[:2 * _bits(n)] for c, v in changed.items() if c in reach[name]}
    return results


def run_probe(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int,
              modules: Iterable[Tuple[str, object]], layer_types: tuple, norm_types: tuple, method: str,
              changed: Callable, zeros_with_rows: Callable, forward: Callable) -> Dict[str, np.ndarray]:
    """The framework-free body of a backend's ``probe_channels(handle, perturb, rows)``: one probe
    forward of ``rows`` rows, where ``perturb[layer] = (first row, codes)`` adds ``codes`` (rows x
    channels) to that layer's (zeroed) output from ``first row`` on and the key None perturbs the image.

    For the pass, ``method`` (the one the framework calls: ``forward``, ``construct``) of every
    module among ``modules`` (``(path, module)``) that is a ``layer_types`` layer of
    ``handle.layers`` or a ``norm_types`` norm is overridden on the instance (and restored after):
    a layer returns ``zeros_with_rows(shape, x, perturb.get(name))`` (zeros shaped like its output,
    of ``x``'s kind, plus the perturbation rows: its own computation is skipped), a norm returns
    its input; both record ``changed(input)``, the (rows, channels) bool array of what differs from
    row 0. ``forward(x)`` runs the model once in eval mode on the image ``zeros_with_rows(shape,
    None, perturb.get(None))``; a tuple output's first entry is taken as the logits.
    Returns ``{layer or norm name or OUTPUT: (rows, width) bool}``."""
    seen: Dict[str, np.ndarray] = {}
    info = {l.name: l for l in handle.layers}

    def layer_method(name):
        l = info[name]

        def method_(x, *args, **kwargs):
            seen.setdefault(name, changed(x))
            if l.kind == "conv":
                shape = (x.shape[0], int(l.out_channels)) + tuple(l.output_hw)
            else:
                shape = tuple(x.shape[:-1]) + (int(l.out_channels),)
            return zeros_with_rows(shape, x, perturb.get(name))
        return method_

    def norm_method(name):
        def method_(x, *args, **kwargs):
            seen.setdefault(name, changed(x))
            return x
        return method_

    overrides = []
    for n, m in modules:
        if isinstance(m, layer_types) and n in info:
            overrides.append((m, layer_method(n)))
        elif isinstance(m, norm_types):
            overrides.append((m, norm_method(n)))
    image = zeros_with_rows((rows,) + tuple(int(d) for d in handle.input_shape[-3:]), None, perturb.get(None))
    patched = []
    try:
        for m, fn in overrides:
            patched.append((m, m.__dict__.get(method)))
            setattr(m, method, fn)
        y = forward(image)
    finally:
        for m, own in patched:
            if own is None:
                delattr(m, method)
            else:
                setattr(m, method, own)
    if isinstance(y, (tuple, list)) and y and hasattr(y[0], "shape"):
        y = y[0]  # (logits, auxiliary outputs...): the logits come first
    if hasattr(y, "shape"):
        seen[OUTPUT] = changed(y)
    return seen


def find_channel_groups(handle) -> List[ChannelGroup]:
    """The channel dependency groups of a model (see the module docstring), in a deterministic
    order: the image's group first, then by the first producer's position in the layer order."""
    backend = backend_of(handle)
    layers = list(handle.layers)
    norms: List[Tuple[str, int]] = list(backend.norm_layers(handle))
    order = {l.name: i for i, l in enumerate(layers)}
    depthwise = {l.name for l in layers if l.kind == "conv" and l.groups > 1
                 and l.groups == l.in_channels == l.out_channels}
    grouped = {l.name for l in layers if l.kind == "conv" and l.groups > 1 and l.name not in depthwise}
    in_width = {l.name: l.in_channels for l in layers}
    for nm, c in norms:
        in_width[nm] = c
    kinds = {l.name: l.kind for l in layers}

    producers: List[Tuple[Optional[str], int]] = [(None, int(handle.input_shape[-3]))]
    producers += [(l.name, l.out_channels) for l in layers]
    results = _probe_all(lambda perturb, rows: backend.probe_channels(handle, perturb, rows), producers)

    uf = _UnionFind()
    size: Dict[str, int] = {}
    fixed: Dict[str, str] = {}   # space -> why it is not prunable
    spatial: Dict[str, int] = {}  # consumer -> columns per channel
    for l in layers:
        size[f"out:{l.name}"] = l.out_channels
        uf.add(f"out:{l.name}")
        if l.name not in depthwise:
            size[f"in:{l.name}"] = l.in_channels
            uf.add(f"in:{l.name}")
    for nm, c in norms:
        size[f"in:{nm}"] = c
        uf.add(f"in:{nm}")
    size[f"out:{INPUT_GROUP}"] = int(handle.input_shape[-3])
    uf.add(f"out:{INPUT_GROUP}")
    fixed[f"out:{INPUT_GROUP}"] = "the model's input"
    for d in depthwise:
        size[f"in:{d}"] = size[f"out:{d}"]
        uf.union(f"out:{d}", f"in:{d}")
    for g in grouped:
        fixed[f"in:{g}"] = f"input of grouped conv {g!r}"
        fixed[f"out:{g}"] = f"output of grouped conv {g!r}"
    out_seen = False

    for name, n in producers:
        src = f"out:{name if name is not None else INPUT_GROUP}"
        for consumer, changed in results[name].items():
            changed = np.asarray(changed, bool)
            if consumer == OUTPUT:
                if changed.any():
                    fixed[src] = "the model's output"
                    out_seen = True
                continue
            if consumer == name:
                continue
            if consumer not in in_width:
                continue
            if changed.shape[1] != in_width[consumer] and kinds.get(consumer) != "linear":
                raise ModelError(f"probe of {consumer!r} saw {changed.shape[1]} input channels, "
                                 f"the layer has {in_width[consumer]}")
            index, fed = decode(changed, n)
            how, s = classify(index, fed, n, kinds.get(consumer) == "linear")
            dst = f"in:{consumer}"
            if how == "same":
                if s > 1:
                    spatial[consumer] = s
                    size[dst] = n
                uf.union(src, dst)
            elif how == "coupled":
                what = "the image" if name is None else repr(name)
                fixed[src] = f"read by {consumer!r} other than channel for channel"
                fixed[dst] = f"fed by {what} other than channel for channel"
    if not out_seen:
        raise ModelError(f"the probe of {handle.model_name!r} never reached the model's output; "
                         "channel groups cannot be found")

    members: Dict[str, List[str]] = {}
    for space in size:
        members.setdefault(uf.find(space), []).append(space)
    groups = []
    for root, spaces in members.items():
        sizes = {size[s] for s in spaces}
        if len(sizes) != 1:
            raise ModelError(f"channel spaces {sorted(spaces)} are joined but have sizes {sorted(sizes)}")
        outs = [s[4:] for s in spaces if s.startswith("out:")]
        ins = [s[3:] for s in spaces if s.startswith("in:")]
        prods = tuple(sorted((o for o in outs if o in order and o not in depthwise), key=order.get))
        cons = tuple(sorted((i for i in ins if i in order and i not in depthwise), key=order.get))
        nrm = tuple(nm for nm, _ in norms if nm in ins)
        dws = tuple(sorted((o for o in outs if o in depthwise), key=order.get))
        has_input = INPUT_GROUP in outs
        if has_input:
            gname = INPUT_GROUP
        elif prods:
            gname = prods[0]
        else:
            firsts = sorted((x for x in set(ins) | set(outs)), key=lambda x: (order.get(x, len(order)), x))
            gname = f"{firsts[0]}:in"
        prunable = bool(prods) and not any(s in fixed for s in spaces)
        key = (-1, "") if has_input else ((order[prods[0]], "") if prods else (len(order), gname))
        groups.append((key, ChannelGroup(gname, sizes.pop(), prods, cons, nrm, dws, prunable,
                                         {c: spatial.get(c, 1) for c in cons})))
    groups.sort(key=lambda t: t[0])
    return [g for _, g in groups]


def group_map(groups: Sequence[ChannelGroup]) -> Dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def check_keep(groups: Sequence[ChannelGroup], keep: Dict[str, Sequence[int]]) -> Dict[str, np.ndarray]:
    """Validate ``{group name: kept indices}``: known, prunable groups, indices in range, at least
    one kept, no repeats. Returns sorted int64 arrays; raises :class:`ModelError` naming the problem."""
    by_name = group_map(groups)
    out: Dict[str, np.ndarray] = {}
    if not isinstance(keep, dict):
        raise ModelError(f"keep must be a dict of group name -> channel indices, got {type(keep).__name__}")
    for name, idx in keep.items():
        if name not in by_name:
            raise ModelError(f"unknown channel group {name!r}; groups: {', '.join(sorted(by_name))}")
        g = by_name[name]
        arr = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ModelError(f"channel indices for group {name!r} must be integers, got {arr.dtype}")
        arr = np.sort(arr.astype(np.int64).ravel())
        if arr.size == 0:
            raise ModelError(f"group {name!r} would keep no channel; keep at least one")
        if arr[0] < 0 or arr[-1] >= g.size:
            raise ModelError(f"group {name!r} has {g.size} channels; index {int(arr[0] if arr[0] < 0 else arr[-1])} "
                             "is out of range")
        if np.any(np.diff(arr) == 0):
            raise ModelError(f"group {name!r}: channel indices repeat")
        if not g.prunable and arr.size != g.size:
            raise ModelError(f"group {name!r} is not prunable (model input/output or coupled channels)")
        out[name] = arr
    return out


def layer_slices(groups: Sequence[ChannelGroup], keep: Dict[str, np.ndarray]):
    """Per layer, which output rows and input columns a compaction keeps.

    Returns ``(out_keep, in_keep, norm_keep, depthwise_keep)``: dicts from layer/BN name to the
    kept indices (input columns of a linear after a flatten already expanded to blocks)."""
    out_keep, in_keep, norm_keep, dw_keep = {}, {}, {}, {}
    for g in groups:
        if g.name not in keep or len(keep[g.name]) == g.size:
            continue
        k = np.asarray(keep[g.name], np.int64)
        for p in g.producers:
            out_keep[p] = k
        for c in g.consumers:
            s = int(g.spatial.get(c, 1))
            in_keep[c] = (k[:, None] * s + np.arange(s)[None, :]).ravel() if s > 1 else k
        for nm in g.norms:
            norm_keep[nm] = k
        for d in g.depthwise:
            dw_keep[d] = k
    return out_keep, in_keep, norm_keep, dw_keep


def compact(handle, keep: Dict[str, Sequence[int]]):
    """Backend-neutral entry point: the ``compact`` of the handle's backend."""
    return backend_of(handle).compact(handle, keep)


def compact_with_plan(handle, plan):
    """Replay a plan's ``kept_channels`` on a model: checks the plan against the model's layer
    signature first (a plan from another model raises :class:`~prunekit.errors.PlanError`), then
    returns the compacted handle; the model given is not changed."""
    from prunekit.errors import PlanError

    plan.check_matches(handle.layers, handle.model_name)
    if not plan.kept_channels:
        raise PlanError("the plan keeps no channel list (kept_channels is empty): nothing to compact")
    return compact(handle, {k: list(v) for k, v in plan.kept_channels.items()})


def zeroed_entries(groups: Sequence[ChannelGroup], keep: Dict[str, Sequence[int]]) -> Dict[str, Dict[str, np.ndarray]]:
    """For a masked (not compacted) equivalent: per parameter entry of the shared state, the
    channel indices to zero. A removed channel's producer rows (weight and bias), depthwise rows
    and BatchNorm weight and bias are zeroed, so its output after the BatchNorm is exactly 0."""
    zero: Dict[str, np.ndarray] = {}
    for g in groups:
        if g.name not in keep:
            continue
        removed = np.setdiff1d(np.arange(g.size), np.asarray(keep[g.name], np.int64))
        for layer in g.producers + g.depthwise:
            zero[f"{layer}.weight"] = removed
            zero[f"{layer}.bias"] = removed
        for nm in g.norms:
            zero[f"{nm}.weight"] = removed
            zero[f"{nm}.bias"] = removed
    return zero


def masked_state(state: Dict[str, np.ndarray], groups: Sequence[ChannelGroup],
                 keep: Dict[str, Sequence[int]]) -> Dict[str, np.ndarray]:
    """A copy of a shared state dict with the removed channels zeroed (see :func:`zeroed_entries`):
    for models whose activations map 0 to 0 (ReLU), its outputs equal the compacted model's."""
    out = {k: np.array(v, copy=True) for k, v in state.items()}
    for key, removed in zeroed_entries(groups, keep).items():
        if key in out:
            out[key][removed] = 0
    return out
