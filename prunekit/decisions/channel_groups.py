"""Channel dependency groups, found from the model itself (issues #4 and #11).

A *channel group* is a set of channels that must be pruned together: the output channels of
every conv/linear layer whose outputs meet (a residual addition, a squeeze-excite gate), the
norm layers over them, the depthwise convs that carry them through, and the input channels of
every layer that reads them (at an offset where it reads a concatenation).
:func:`find_channel_groups` finds them from the model, not from a table of layer names, with one
implementation for every backend; a backend only provides the probe below (its framework-free
part is :func:`run_probe`) and lists its norm layers (:class:`NormLayer`).

The probe (one eval-mode forward per chunk of rows, the backend's ``probe_channels``):

* every conv/linear layer's output is replaced by the constant :data:`PROBE_BASE` (1.0), so no
  signal crosses a layer that mixes channels, while a product of two tensors (a gate) passes a
  change in either; every norm layer is replaced by the identity (BatchNorm is per-channel by
  definition and its scale could be zero or negative and hide the signal; GroupNorm and
  LayerNorm are ruled on separately);
* for a producer ``P`` with ``C`` output channels, row ``2b+1`` adds 1.0 to the channels whose
  index has bit ``b`` set and row ``2b+2`` to those whose bit ``b`` is clear (``ceil(log2 C)``
  bit pairs); row 0 of each forward is left unperturbed (the reference);
* the input of every conv/linear/norm (and the model's output) is recorded: a channel (or,
  after a flatten, a feature) *changed* in a row when it differs from row 0 anywhere.

A consumer column that changed in exactly one row of every bit pair is fed one-to-one by the
producer channel whose index the pattern spells. A consumer fed by ``P`` so that column ``c``
reads channel ``c`` (or a linear layer whose columns come in blocks of ``s`` per channel, a
flatten) shares ``P``'s channel space; one run of consecutive columns fed by consecutive
channels joins those ranges (a concatenation, a split); anything else (a permutation, a repeated
or mixed feed, ranges overlapping unequally as in a zero-padded shortcut) marks both spaces not
prunable. A depthwise conv's input and output are one space; a grouped conv's input and output
groups are ``balanced`` (as many kept per conv group), a GroupNorm's ``whole`` (whole norm groups
kept or dropped). Ranges joined by a union-find form the groups; a group reaching the model's
output (logits), fed by the image, or normalised across all its channels (LayerNorm) is not
prunable, and says why in ``reason``. Channels-last and token layouts raise :class:`ModelError`.
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


class NormLayer(tuple):
    """One normalisation layer as a backend's ``norm_layers`` lists it: unpacks as
    ``(name, channels)``; ``block`` says which channels it normalises together: 1 per channel
    (BatchNorm, a GroupNorm with one channel per group), ``b`` > 1 blocks of ``b`` consecutive
    channels (GroupNorm), 0 all channels at once (LayerNorm over channels, a one-group GroupNorm);
    ``kind`` names the layer's class for messages."""

    def __new__(cls, name: str, channels: int, block: int = 1, kind: str = "BatchNorm"):
        self = super().__new__(cls, (name, int(channels)))
        self.block = int(block)
        self.kind = kind
        return self


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels pruned together (see the module docstring).

    Members are listed by layer name. A member holds the group's ``size`` channels along its
    whole channel axis unless it is named in ``out_offsets`` (producers, depthwise convs: output
    channels) or ``in_offsets`` (consumers, norms: input channels), which give the first index of
    the group's channels in that layer's axis (the layer sees a concatenation, or a split).
    ``balanced`` > 1: the channels form that many equal consecutive blocks (the groups of a
    grouped conv) and a keep must keep the same number in each; ``whole`` > 1: blocks of that many
    channels (a GroupNorm's groups) are kept or dropped whole. ``reason`` says why a group is not
    prunable ("" when it is)."""

    name: str                   # the first producer's layer name in model layer order, e.g. "conv1"
    size: int                   # number of channels
    producers: Tuple[str, ...]  # conv/linear (non-depthwise) whose OUTPUT channels are these channels
    consumers: Tuple[str, ...]  # conv/linear (non-depthwise) whose INPUT channels are these channels
    norms: Tuple[str, ...]      # normalisation layers over these channels
    depthwise: Tuple[str, ...]  # depthwise convs whose input AND output channels are these channels
    prunable: bool              # False when the channels are the model's input or output, or coupled
    spatial: Dict[str, int] = field(default_factory=dict)  # consumer -> columns per channel
    reason: str = ""            # why not prunable
    out_offsets: Dict[str, int] = field(default_factory=dict)  # producer/depthwise -> first output index
    in_offsets: Dict[str, int] = field(default_factory=dict)   # consumer/norm -> first input index
    balanced: int = 1
    whole: int = 1

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "producers": list(self.producers),
                "consumers": list(self.consumers), "norms": list(self.norms), "depthwise": list(self.depthwise),
                "prunable": self.prunable, "spatial": dict(self.spatial), "reason": self.reason,
                "out_offsets": dict(self.out_offsets), "in_offsets": dict(self.in_offsets),
                "balanced": self.balanced, "whole": self.whole}

    def out_index(self, layer: str, channels: np.ndarray) -> np.ndarray:
        """Group channel indices as indices of ``layer``'s output axis (a producer or depthwise conv)."""
        return np.asarray(channels, np.int64) + int(self.out_offsets.get(layer, 0))

    def in_index(self, layer: str, channels: np.ndarray) -> np.ndarray:
        """Group channel indices as columns of ``layer``'s input (a consumer or norm; a linear after
        a flatten gets ``spatial`` columns per channel)."""
        k = np.asarray(channels, np.int64) + int(self.in_offsets.get(layer, 0))
        s = int(self.spatial.get(layer, 1))
        return (k[:, None] * s + np.arange(s)[None, :]).ravel() if s > 1 else k


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


#: what a conv/linear layer's replaced output holds in the probe besides its perturbation rows:
#: not zero, so a product (a squeeze-excite gate times the features) passes a change in either factor
PROBE_BASE = 1.0


def run_probe(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int,
              modules: Iterable[Tuple[str, object]], layer_types: tuple, norm_types: tuple, method: str,
              changed: Callable, zeros_with_rows: Callable, forward: Callable,
              layout_error: Optional[Callable] = None) -> Dict[str, np.ndarray]:
    """The framework-free body of a backend's ``probe_channels(handle, perturb, rows)``: one probe
    forward of ``rows`` rows, where ``perturb[layer] = (first row, codes)`` adds ``codes`` (rows x
    channels) to that layer's replaced output from ``first row`` on and the key None perturbs the image.

    For the pass, ``method`` (the one the framework calls: ``forward``, ``construct``) of every
    module among ``modules`` (``(path, module)``) that is a ``layer_types`` layer of
    ``handle.layers`` or a ``norm_types`` norm is overridden on the instance (and restored after):
    a layer returns ``zeros_with_rows(shape, x, perturb.get(name), PROBE_BASE)`` (a constant
    :data:`PROBE_BASE` shaped like its output, of ``x``'s kind, plus the perturbation rows: its own
    computation is skipped), a norm returns its input; both record ``changed(input)``, the (rows,
    channels) bool array of what differs from row 0. ``forward(x)`` runs the model once in eval
    mode on the image ``zeros_with_rows(shape, None, perturb.get(None), 0.0)``; a tuple output's
    first entry is taken as the logits.

    Layouts the groups cannot describe raise :class:`ModelError` naming the layer: a linear layer
    applied to a tensor of more than two axes (channels-last features, tokens), and whatever
    ``layout_error(name, module, x)`` (the backend's check of a norm's input) returns a reason for.
    Returns ``{layer or norm name or OUTPUT: (rows, width) bool}``."""
    seen: Dict[str, np.ndarray] = {}
    info = {l.name: l for l in handle.layers}

    def layer_method(name):
        l = info[name]

        def method_(x, *args, **kwargs):
            if l.kind == "conv":
                shape = (x.shape[0], int(l.out_channels)) + tuple(l.output_hw)
            else:
                if len(x.shape) != 2:
                    raise ModelError(
                        f"structured pruning: linear layer {name!r} is applied over the last axis of a "
                        f"{len(x.shape)}-axis tensor (channels-last features or tokens, as in ConvNeXt, ViT, "
                        "Swin); channel groups support channels-first convs and linear layers on (batch, "
                        "features). Unstructured pruning works on this model")
                shape = tuple(x.shape[:-1]) + (int(l.out_channels),)
            seen.setdefault(name, changed(x))
            return zeros_with_rows(shape, x, perturb.get(name), PROBE_BASE)
        return method_

    def norm_method(name, module):
        def method_(x, *args, **kwargs):
            why = layout_error(name, module, x) if layout_error is not None else None
            if why:
                raise ModelError(f"structured pruning: norm {name!r} {why}; channel groups support "
                                 "channels-first features. Unstructured pruning works on this model")
            seen.setdefault(name, changed(x))
            return x
        return method_

    overrides = []
    for n, m in modules:
        if isinstance(m, layer_types) and n in info:
            overrides.append((m, layer_method(n)))
        elif isinstance(m, norm_types):
            overrides.append((m, norm_method(n, m)))
    image = zeros_with_rows((rows,) + tuple(int(d) for d in handle.input_shape[-3:]), None, perturb.get(None), 0.0)
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
    if isinstance(y, dict):
        raise ModelError(f"the probe of {handle.model_name!r} got a dict output; channel groups need a "
                         "tensor (or a tuple whose first entry is the logits)")
    if hasattr(y, "shape"):
        seen[OUTPUT] = changed(y)
    return seen


def _runs(index: np.ndarray, fed: np.ndarray) -> Optional[List[Tuple[int, int, int]]]:
    """``[(first column, first channel, length)]``: the runs of consecutive columns fed one-to-one
    by consecutive channels; None when a fed column is not fed one-to-one by a single channel."""
    if np.any(fed & (index < 0)):
        return None
    out: List[Tuple[int, int, int]] = []
    cols = np.flatnonzero(fed)
    for c in cols:
        if out and out[-1][0] + out[-1][2] == c and out[-1][1] + out[-1][2] == index[c]:
            a, b, n = out[-1]
            out[-1] = (a, b, n + 1)
        else:
            out.append((int(c), int(index[c]), 1))
    return out


def _lcm(a: int, b: int) -> int:
    return a * b // int(np.gcd(a, b))


def find_channel_groups(handle) -> List[ChannelGroup]:
    """The channel dependency groups of a model (see the module docstring), in a deterministic
    order: the image's group first, then by the first producer's position in the layer order.

    Every layer's output channels and every consumer's or norm's input channels form a *space*;
    links found by the probe join ranges of two spaces channel for channel (a concatenation joins
    a range of the consumer's input to a producer's output, a split a range of the producer's
    output to a consumer's input). Spaces are cut where any link starts or ends (the cuts carried
    across links until none is added), and the ranges joined by links form the groups. A group
    that cannot be pruned says why in ``reason``."""
    backend = backend_of(handle)
    layers = list(handle.layers)
    norms = [n if isinstance(n, NormLayer) else NormLayer(*n) for n in backend.norm_layers(handle)]
    order = {l.name: i for i, l in enumerate(layers)}
    depthwise = {l.name for l in layers if l.kind == "conv" and l.groups > 1
                 and l.groups == l.in_channels == l.out_channels}
    grouped = {l.name: int(l.groups) for l in layers if l.kind == "conv" and l.groups > 1 and l.name not in depthwise}
    in_width = {l.name: l.in_channels for l in layers}
    norm_info = {nm[0]: nm for nm in norms}
    for nm in norms:
        in_width[nm[0]] = nm[1]
    kinds = {l.name: l.kind for l in layers}

    producers: List[Tuple[Optional[str], int]] = [(None, int(handle.input_shape[-3]))]
    producers += [(l.name, l.out_channels) for l in layers]
    results = _probe_all(lambda perturb, rows: backend.probe_channels(handle, perturb, rows), producers)

    size: Dict[str, int] = {}
    fixed: Dict[str, str] = {}    # space -> why it is not prunable
    spatial: Dict[str, int] = {}  # consumer -> columns per channel
    links: List[Tuple[str, int, str, int, int]] = []  # (space, offset, space, offset, length)
    for l in layers:
        size[f"out:{l.name}"] = l.out_channels
        if l.name not in depthwise:
            size[f"in:{l.name}"] = l.in_channels
    for nm in norms:
        size[f"in:{nm[0]}"] = nm[1]
        if nm.block == 0:
            fixed[f"in:{nm[0]}"] = (f"{nm.kind} {nm[0]!r} normalises over all its channels: removing one "
                                    "changes the others")
    size[f"out:{INPUT_GROUP}"] = int(handle.input_shape[-3])
    fixed[f"out:{INPUT_GROUP}"] = "the model's input"
    for d in depthwise:
        size[f"in:{d}"] = size[f"out:{d}"]
        links.append((f"out:{d}", 0, f"in:{d}", 0, size[f"out:{d}"]))
    for g, n in grouped.items():
        for side in ("in", "out"):
            if size[f"{side}:{g}"] // n < 2:
                fixed[f"{side}:{g}"] = f"grouped conv {g!r} has one {side}put channel per group"
    out_seen = False
    fed_cols: Dict[str, np.ndarray] = {}  # consumer -> columns fed by some producer

    for name, n in producers:
        src = f"out:{name if name is not None else INPUT_GROUP}"
        what = "the image" if name is None else repr(name)
        for consumer, changed in results[name].items():
            changed = np.asarray(changed, bool)
            if consumer == OUTPUT:
                if changed.any():
                    fixed[src] = "the model's output"
                    out_seen = True
                continue
            if consumer == name or consumer not in in_width:
                continue
            if changed.shape[1] != in_width[consumer] and kinds.get(consumer) != "linear":
                raise ModelError(f"probe of {consumer!r} saw {changed.shape[1]} input channels, "
                                 f"the layer has {in_width[consumer]}")
            index, fed = decode(changed, n)
            if not fed.any():
                continue
            if changed.shape[1] == in_width[consumer]:
                fed_cols[consumer] = fed_cols.get(consumer, np.zeros(fed.shape, bool)) | fed
            dst = f"in:{consumer}"
            how, s = classify(index, fed, n, kinds.get(consumer) == "linear")
            if how == "same":
                if s > 1:
                    spatial[consumer] = s
                    size[dst] = n
                links.append((src, 0, dst, 0, n))
                continue
            runs = _runs(index, fed) if changed.shape[1] == in_width[consumer] else None
            if runs is None or len(runs) != 1:
                why = "mixes them" if runs is None else "permutes or repeats them"
                fixed[src] = f"read by {consumer!r}, which {why}"
                fixed[dst] = f"fed by {what}, which it mixes, permutes or repeats"
                continue
            a, b, length = runs[0]
            links.append((src, b, dst, a, length))
    if not out_seen:
        raise ModelError(f"the probe of {handle.model_name!r} never reached the model's output; "
                         "channel groups cannot be found")
    into: Dict[str, List[Tuple[int, int]]] = {}
    for s1, o1, s2, o2, n in links:
        if s2.startswith("in:") and not s1.startswith("in:"):
            into.setdefault(s2, []).append((o2, n))
    for dst, spans in into.items():
        ranges = sorted(set(spans))  # several producers may feed one range (an addition, a product)
        if any(a + n > b for (a, n), (b, _) in zip(ranges[:-1], ranges[1:])):  # overlapping, not equal
            fixed.setdefault(dst, f"{dst[3:]!r} adds channels at an offset (a zero-padded shortcut): "
                                  "their numbers are fixed")
            for s1, o1, s2, o2, n in [lk for lk in links if lk[2] == dst and (lk[3], lk[4]) != (0, size[dst])]:
                fixed.setdefault(s1, f"added at an offset into the input of {dst[3:]!r} (a zero-padded shortcut)")
            links = [lk for lk in links if not (lk[2] == dst and (lk[3], lk[4]) != (0, size[dst]))]
    for consumer, fed in fed_cols.items():
        if not fed.all() and f"in:{consumer}" not in fixed:
            fixed[f"in:{consumer}"] = (f"{consumer!r} reads {int((~fed).sum())} input channels no layer produces "
                                       "(zero padding or constants): their number is fixed")

    # cut every space where a link starts or ends, and carry cuts across links until stable
    cuts: Dict[str, set] = {sp: {0, n} for sp, n in size.items()}
    for s1, o1, s2, o2, n in links:
        cuts[s1] |= {o1, o1 + n}
        cuts[s2] |= {o2, o2 + n}
    changed_any = True
    while changed_any:
        changed_any = False
        for s1, o1, s2, o2, n in links:
            for sa, oa, sb, ob in ((s1, o1, s2, o2), (s2, o2, s1, o1)):
                new = {ob + t - oa for t in cuts[sa] if oa < t < oa + n} - cuts[sb]
                if new:
                    cuts[sb] |= new
                    changed_any = True
    starts = {sp: sorted(c) for sp, c in cuts.items()}
    uf = _UnionFind()
    length: Dict[Tuple[str, int], int] = {}
    for sp, c in starts.items():
        for a, b in zip(c[:-1], c[1:]):
            uf.add((sp, a))
            length[(sp, a)] = b - a
    for s1, o1, s2, o2, n in links:
        for t in starts[s1]:
            if o1 <= t < o1 + n:
                uf.union((s1, t), (s2, o2 + t - o1))

    members: Dict[object, List[Tuple[str, int]]] = {}
    for piece in length:
        members.setdefault(uf.find(piece), []).append(piece)
    groups = []
    for root, pieces in members.items():
        sizes = {length[p] for p in pieces}
        if len(sizes) != 1:
            raise ModelError(f"channel ranges {sorted(pieces)} are joined but have sizes {sorted(sizes)}")
        n = sizes.pop()
        reason = next((fixed[sp] for sp, _ in sorted(pieces) if sp in fixed), "")
        outs = [(sp[4:], o) for sp, o in pieces if sp.startswith("out:")]
        ins = [(sp[3:], o) for sp, o in pieces if sp.startswith("in:")]
        named = [x for x, _ in outs] + [f"in:{x}" for x, _ in ins]
        if not reason and len(set(named)) != len(named):
            reason = "a layer holds these channels twice (at two offsets)"
        out_off = {x: o for x, o in outs if (o, n) != (0, size[f"out:{x}"])}
        in_off = {x: o for x, o in ins if (o, n) != (0, size[f"in:{x}"])}
        prods = tuple(sorted({o for o, _ in outs if o in order and o not in depthwise}, key=order.get))
        cons = tuple(sorted({i for i, _ in ins if i in order and i not in depthwise}, key=order.get))
        nrm = tuple(nm[0] for nm in norms if nm[0] in {i for i, _ in ins})
        dws = tuple(sorted({o for o, _ in outs if o in depthwise}, key=order.get))
        has_input = INPUT_GROUP in {o for o, _ in outs}
        if not reason and not prods:
            reason = "no conv or linear layer produces these channels"
        balanced, whole = 1, 1
        for layer, off, side in [(x, out_off.get(x), "out") for x in prods] + [(x, in_off.get(x), "in") for x in cons]:
            if layer in grouped and not reason:
                if off is not None:
                    reason = f"grouped conv {layer!r} holds only part of these channels"
                else:
                    balanced = _lcm(balanced, grouped[layer])
        for nm in nrm:
            block = norm_info[nm].block
            if block > 1 and not reason:
                off = in_off.get(nm, 0)
                if off % block or n % block:
                    reason = f"{norm_info[nm].kind} {nm!r} has groups of {block} channels across these channels' edges"
                else:
                    whole = _lcm(whole, block)
        if not reason and balanced > 1 and (n % balanced or (whole > 1)):
            reason = (f"grouped convs split these {n} channels into {balanced} groups"
                      + (" and a GroupNorm's groups must be kept whole" if whole > 1 else " unevenly"))
        if not reason and whole >= n:
            reason = f"a GroupNorm's group spans all {n} channels"
        if has_input:
            gname = INPUT_GROUP
        elif prods:
            gname = prods[0] + (f"@{out_off[prods[0]]}" if prods[0] in out_off else "")
        else:
            firsts = sorted({x for x in [i for i, _ in ins] + [o for o, _ in outs]},
                            key=lambda x: (order.get(x, len(order)), x))
            gname = f"{firsts[0]}:in" + (f"@{in_off[firsts[0]]}" if firsts[0] in in_off else "")
        key = ((-1, 0, "") if has_input else
               ((order[prods[0]], out_off.get(prods[0], 0), "") if prods else (len(order), 0, gname)))
        groups.append((key, ChannelGroup(gname, n, prods, cons, nrm, dws, not reason,
                                         {c: spatial.get(c, 1) for c in cons}, reason, out_off, in_off,
                                         balanced, whole)))
    groups.sort(key=lambda t: t[0])
    names = [g.name for _, g in groups]
    if len(set(names)) != len(names):
        raise ModelError(f"channel group names repeat in {handle.model_name!r}: {sorted(names)}")
    return [g for _, g in groups]


def group_map(groups: Sequence[ChannelGroup]) -> Dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def check_keep(groups: Sequence[ChannelGroup], keep: Dict[str, Sequence[int]]) -> Dict[str, np.ndarray]:
    """Validate ``{group name: kept indices}``: known, prunable groups, indices in range, at least
    one kept, no repeats, a ``balanced`` group keeping as many in each block, a ``whole`` group
    keeping whole blocks. Returns sorted int64 arrays; raises :class:`ModelError` naming the problem."""
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
            raise ModelError(f"group {name!r} is not prunable: {g.reason or 'model input/output or coupled channels'}")
        if arr.size != g.size and g.balanced > 1:
            counts = np.bincount(arr // (g.size // g.balanced), minlength=g.balanced)
            if np.any(counts != counts[0]):
                raise ModelError(f"group {name!r} feeds grouped convs: keep the same number of channels in each "
                                 f"of its {g.balanced} blocks of {g.size // g.balanced} (kept {counts.tolist()})")
        if arr.size != g.size and g.whole > 1:
            counts = np.bincount(arr // g.whole, minlength=g.size // g.whole)
            if np.any((counts != 0) & (counts != g.whole)):
                raise ModelError(f"group {name!r} is normalised in groups of {g.whole} channels (GroupNorm): "
                                 "keep or drop whole groups")
        out[name] = arr
    return out


def fit_keep(group: ChannelGroup, scores: Sequence[float], count: int) -> np.ndarray:
    """The ``count`` (at least one) highest-scoring channels of ``group`` that :func:`check_keep`
    accepts: rounded down to a multiple of ``balanced`` and taken evenly from its blocks, or whole
    ``whole`` blocks ranked by their summed score. Ties go to the lower index."""
    scores = np.asarray(scores, np.float64).ravel()
    count = int(min(max(count, 1), group.size))
    if count == group.size:
        return np.arange(group.size)
    if group.whole > 1:
        blocks = scores.reshape(-1, group.whole).sum(axis=1)
        nb = max(1, int(round(count / group.whole)))
        top = np.sort(np.argsort(-blocks, kind="stable")[:nb])
        return (top[:, None] * group.whole + np.arange(group.whole)[None, :]).ravel()
    if group.balanced > 1:
        per = max(1, count // group.balanced)
        width = group.size // group.balanced
        parts = [b * width + np.sort(np.argsort(-scores[b * width:(b + 1) * width], kind="stable")[:per])
                 for b in range(group.balanced)]
        return np.concatenate(parts)
    return np.sort(np.argsort(-scores, kind="stable")[:count])


def _assemble(pieces: List[Tuple[int, int, Optional[np.ndarray]]]) -> Optional[np.ndarray]:
    """One axis's kept indices from its pieces ``(offset, length, kept or None: all)``; None when
    nothing is dropped."""
    pieces = sorted(pieces, key=lambda p: p[0])
    if all(k is None for _, _, k in pieces):
        return None
    return np.concatenate([(np.arange(n) if k is None else np.asarray(k, np.int64)) + off for off, n, k in pieces])


def layer_slices(groups: Sequence[ChannelGroup], keep: Dict[str, np.ndarray]):
    """Per layer, which output rows and input columns a compaction keeps.

    Returns ``(out_keep, in_keep, norm_keep, depthwise_keep)``: dicts from layer/norm name to the
    kept indices of its whole axis (pieces of concatenations and splits put at their offsets, input
    columns of a linear after a flatten expanded to blocks); an axis that loses nothing is absent."""
    out_p: Dict[str, list] = {}
    in_p: Dict[str, list] = {}
    norm_p: Dict[str, list] = {}
    dw_p: Dict[str, list] = {}
    for g in groups:
        k = keep.get(g.name)
        k = None if k is None or len(k) == g.size else np.asarray(k, np.int64)
        for p in g.producers:
            out_p.setdefault(p, []).append((g.out_offsets.get(p, 0), g.size, k))
        for d in g.depthwise:
            dw_p.setdefault(d, []).append((g.out_offsets.get(d, 0), g.size, k))
        for c in g.consumers:
            s = int(g.spatial.get(c, 1))
            kc = None if k is None else (k[:, None] * s + np.arange(s)[None, :]).ravel() if s > 1 else k
            in_p.setdefault(c, []).append((g.in_offsets.get(c, 0) * s, g.size * s, kc))
        for nm in g.norms:
            norm_p.setdefault(nm, []).append((g.in_offsets.get(nm, 0), g.size, k))
    out = []
    for table in (out_p, in_p, norm_p, dw_p):
        assembled = {name: _assemble(pieces) for name, pieces in table.items()}
        out.append({name: a for name, a in assembled.items() if a is not None})
    return tuple(out)


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


def zeroed_entries(groups: Sequence[ChannelGroup], keep: Dict[str, Sequence[int]]) -> Dict[str, np.ndarray]:
    """For a masked (not compacted) equivalent: per parameter entry of the shared state, the
    indices (along its first axis) to zero. A removed channel's producer rows (weight and bias),
    depthwise rows and norm weight and bias are zeroed, so its output after the norm is exactly 0."""
    zero: Dict[str, list] = {}
    for g in groups:
        if g.name not in keep:
            continue
        removed = np.setdiff1d(np.arange(g.size), np.asarray(keep[g.name], np.int64))
        if removed.size == 0:
            continue
        for layer in g.producers + g.depthwise:
            for leaf in ("weight", "bias"):
                zero.setdefault(f"{layer}.{leaf}", []).append(g.out_index(layer, removed))
        for nm in g.norms:
            for leaf in ("weight", "bias"):
                zero.setdefault(f"{nm}.{leaf}", []).append(removed + int(g.in_offsets.get(nm, 0)))
    return {k: np.concatenate(v) for k, v in zero.items()}


def masked_state(state: Dict[str, np.ndarray], groups: Sequence[ChannelGroup],
                 keep: Dict[str, Sequence[int]]) -> Dict[str, np.ndarray]:
    """A copy of a shared state dict with the removed channels zeroed (see :func:`zeroed_entries`):
    for models whose activations map 0 to 0 (ReLU), its outputs equal the compacted model's."""
    out = {k: np.array(v, copy=True) for k, v in state.items()}
    for key, removed in zeroed_entries(groups, keep).items():
        if key in out:
            out[key][removed] = 0
    return out


class NormGateLayout:
    """Where each group's channels sit in the norm layers that carry them, for per-channel gates
    (DSA) multiplied onto norm outputs: one gate vector per norm, assembled from the slices of
    every gated group it normalises (a norm over a concatenation holds several groups, each at its
    offset); channels of a norm that no gated group holds keep a gate of 1.

    ``groups``: ``{group name: (norm names, size)}`` or ``(norm names, size, {norm: offset})``;
    ``norm_channels``: ``{norm name: channels}`` as the backend reads them from the model."""

    def __init__(self, groups, norm_channels: Dict[str, int]):
        self.sizes: Dict[str, int] = {}
        #: norm -> [(group name, offset, size)] in offset order
        self.pieces: Dict[str, List[Tuple[str, int, int]]] = {}
        for name, spec in groups.items():
            norms, size = spec[0], int(spec[1])
            offsets = dict(spec[2]) if len(spec) > 2 and spec[2] else {}
            self.sizes[name] = size
            for norm in norms:
                if norm not in norm_channels:
                    raise ModelError(f"channel group {name!r} names norm layer {norm!r}, which the model does not have")
                first = int(offsets.get(norm, 0))
                if first < 0 or first + size > int(norm_channels[norm]):
                    raise ModelError(f"channel group {name!r}: channels {first}..{first + size - 1} do not fit norm "
                                     f"{norm!r} with {norm_channels[norm]} channels")
                self.pieces.setdefault(norm, []).append((name, first, size))
        self.channels = {n: int(norm_channels[n]) for n in self.pieces}
        for norm, parts in self.pieces.items():
            parts.sort(key=lambda p: p[1])
            for (a, fa, na), (b, fb, _) in zip(parts, parts[1:]):
                if fb < fa + na:
                    raise ModelError(f"norm {norm!r}: channel groups {a!r} and {b!r} overlap (channels from {fb}); "
                                     "a channel can carry one gate only")

    def assemble(self, values: Dict[str, np.ndarray], current: Optional[Dict[str, np.ndarray]] = None
                 ) -> Dict[str, np.ndarray]:
        """Per norm touched by ``values``, its whole gate vector (float32): ``current`` (or ones)
        with each given group's values written at its offset."""
        out: Dict[str, np.ndarray] = {}
        for norm, parts in self.pieces.items():
            if not any(g in values for g, _, _ in parts):
                continue
            base = current.get(norm) if current is not None else None
            vec = np.ones(self.channels[norm], np.float32) if base is None else np.array(base, np.float32, copy=True)
            for g, first, size in parts:
                if g in values:
                    v = np.asarray(values[g], np.float32).ravel()
                    if v.size != size:
                        raise ModelError(f"gate of group {g!r} has {v.size} values, the group {size} channels")
                    vec[first:first + size] = v
            out[norm] = vec
        return out

    def split(self, norm_grads: Dict[str, Optional[np.ndarray]]) -> Dict[str, np.ndarray]:
        """Per group, the sum over its norms of the gradient at its slice (the group's channels
        share one mask, so its gradient is the sum over the places it is applied)."""
        out = {g: np.zeros(n, np.float32) for g, n in self.sizes.items()}
        for norm, parts in self.pieces.items():
            grad = norm_grads.get(norm)
            if grad is None:
                continue
            grad = np.asarray(grad, np.float32).ravel()
            for g, first, size in parts:
                out[g] += grad[first:first + size]
        return out
