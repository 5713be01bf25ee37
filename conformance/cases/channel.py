"""Cases ``decisions/channel_groups/*`` and ``decisions/channel_compaction/*``: the channel
dependency groups each backend's probe finds in every reference model, and the narrow dense
model each backend builds from identical weights and kept channels."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..fixtures import rng
from .base import Case, Outputs, Tol


CHANNEL_MODELS = (("resnet20", 3, 32), ("resnet32", 3, 32), ("resnet56", 3, 32), ("vgg16", 3, 32),
                  ("mobilenetv2", 3, 32), ("mnist_cnn", 1, 28))


def _group_code(group, layer_index: Dict[str, int], norm_index: Dict[str, int]) -> np.ndarray:
    """A group as integers (layer and BatchNorm positions in definition order, the same on both
    backends): size, prunable, then producers, consumers with their columns per channel, norms
    and depthwise convs, each list preceded by its length."""
    code = [group.size, int(group.prunable), len(group.producers)] + [layer_index[p] for p in group.producers]
    code += [len(group.consumers)] + [v for c in group.consumers for v in (layer_index[c], group.spatial.get(c, 1))]
    code += [len(group.norms)] + [norm_index[n] for n in group.norms]
    code += [len(group.depthwise)] + [layer_index[d] for d in group.depthwise]
    return np.array(code, np.int64)


def _channel_groups(backend, model: str, in_ch: int, size: int) -> Outputs:
    """The dependency groups found by each backend's probe, as integer codes per group name."""
    from prunekit.decisions.channel_groups import find_channel_groups

    handle = backend.model_handle(model, 10, in_ch, size, seed=41)
    norms = backend.norm_layers(handle)
    layer_index = {l.name: i for i, l in enumerate(handle.layers)}
    norm_index = {n: i for i, (n, _) in enumerate(norms)}
    groups = find_channel_groups(handle)
    out = {f"group/{g.name}": _group_code(g, layer_index, norm_index) for g in groups}
    out["order"] = np.array([layer_index.get(g.name, -1) for g in groups], np.int64)
    return out


def _channel_compaction(backend, model: str, in_ch: int, size: int) -> Outputs:
    """Identical weights (BatchNorm statistics made non-trivial), channels chosen by the channel
    baseline from them (host float64: bitwise), compacted on each backend: kept channels, new
    layer shapes and MACs exact, logits within float32 noise."""
    from prunekit.algorithms.channel import choose_channels
    from prunekit.decisions.channel_groups import find_channel_groups
    from prunekit.decisions.flops import count_model

    handle = backend.model_handle(model, 10, in_ch, size, seed=42)
    r = rng(43)
    state = handle.state_numpy()
    for k in sorted(state):
        v = state[k]
        if v.ndim == 1 and not k.endswith(".bias") or k.endswith(("running_mean",)):
            state[k] = (r.uniform(0.5, 1.5, v.shape) if not k.endswith("running_mean")
                        else r.normal(0, 0.1, v.shape)).astype(np.float32)
    handle.load_state_numpy(state)
    groups = find_channel_groups(handle)
    keep = choose_channels(handle.layers, groups, handle.weights_numpy(), 0.5, "flops")
    small = backend.compact(handle, keep)
    x = rng(44).standard_normal((4, in_ch, size, size)).astype(np.float32)
    counts = count_model(small.layers, small.weights_numpy(), small.state_numpy())
    out = {f"keep/{k}": np.asarray(v, np.int64) for k, v in keep.items()}
    out["layer_shapes"] = np.array([s for l in small.layers for s in l.weight_shape], np.int64)
    out["macs"] = np.array([counts["dense_macs"], counts["total_params"]], np.int64)
    logits = small.predict(x)
    scale = float(np.abs(logits).max())  # random-init logits of deep models can be tiny: compare
    out["logit_scale"] = np.array([scale])  # the scale relatively and the logits relative to it
    out["logits"] = logits / scale
    return out


def cases() -> List[Case]:
    # Groups and kept channels are decisions: bitwise. The compacted models' logits come from
    # each framework's float32 convolutions on identical weights: their largest magnitude within
    # 1e-4 relative, the logits divided by it within 1e-4 (measured: 1e-6 or less).
    cases = [Case(f"decisions/channel_groups/{m}", "decisions", (lambda b, m=m, c=c, s=s: _channel_groups(b, m, c, s)))
             for m, c, s in CHANNEL_MODELS]
    for m, c, s in (("resnet20", 3, 32), ("vgg16", 3, 32), ("mobilenetv2", 3, 32), ("mnist_cnn", 1, 28)):
        cases.append(Case(f"decisions/channel_compaction/{m}", "decisions",
                          (lambda b, m=m, c=c, s=s: _channel_compaction(b, m, c, s)), None,
                          {"logits": Tol("close", atol=1e-4), "logit_scale": Tol("close", rtol=1e-4)}))
    return cases
