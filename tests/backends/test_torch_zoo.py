"""The models PyTorch users train (issue #11): torchvision and timm CNNs (and a ViT), randomly
initialised, at 32x32, batch 2, one or two steps each. For every model: unstructured magnitude
and RPG prune it (pruned weights exactly zero), channel groups are found (or refused with a
ModelError), the channel baseline reaches half the MACs, and the compacted model computes what
the masked model computes within 1e-4 relative; or prunekit refuses with a ModelError. No
other exception is acceptable. DSA, sDprun and PreCropping run on two real CNNs here, and with the
channel baseline on six of every structure in test_torch_zoo_algorithms.py.

Models whose layout prunekit does not prune channel-wise (channels-last blocks, tokens) are listed
in ``REFUSAL_OK``: a ModelError is the right answer for them; for any other model a refusal fails.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.decisions.channel_groups import find_channel_groups  # noqa: E402
from prunekit.decisions.flops import count_model  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402

TORCH = get_backend("torch")
SHAPE = (3, 32, 32)
M = tv.models
MODELS = {
    "resnet18": lambda: M.resnet18(num_classes=10),
    "resnet50": lambda: M.resnet50(num_classes=10),
    "mobilenet_v2": lambda: M.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: M.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: M.efficientnet_b0(num_classes=10),
    "densenet121": lambda: M.densenet121(num_classes=10),
    "googlenet": lambda: M.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "regnet_x_400mf": lambda: M.regnet_x_400mf(num_classes=10),
    "regnet_y_400mf": lambda: M.regnet_y_400mf(num_classes=10),
    "shufflenet_v2_x1_0": lambda: M.shufflenet_v2_x1_0(num_classes=10),
    "convnext_tiny": lambda: M.convnext_tiny(num_classes=10),
    "vit_b_16": lambda: M.vit_b_16(num_classes=10, image_size=32),
    "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "timm/mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
    "timm/rexnet_100": lambda: timm.create_model("rexnet_100", num_classes=10),
    "timm/convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
    "timm/resnet18": lambda: timm.create_model("resnet18", num_classes=10),
}
#: channels-last blocks (LayerNorm and Linear over the last axis) and tokens: refused channel-wise
REFUSAL_OK = {"convnext_tiny", "vit_b_16", "timm/convnext_atto"}
_BUILT = {}


def _randomise_norms(model, seed=0):
    """Running statistics and affine parameters away from (0, 1, 1, 0), so a removed channel's
    norm output is not zero and the masked model must really not read it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _model(name):
    """A fresh copy of model ``name`` (built once per module, seeded)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        m = MODELS[name]()
        _randomise_norms(m)
        _BUILT[name] = m.eval()
    return copy.deepcopy(_BUILT[name])


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _BUILT.clear()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2,) + SHAPE, generator=g), torch.tensor([1, 7])


def _train(handle, algorithm, steps):
    """``steps`` SGD steps through a PruningSession; in eval mode, since batch statistics of two
    samples at 1x1 spatial size would make a randomly initialised deep net diverge."""
    model = handle.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    session = TORCH.PruningSession(handle, algorithm, opt, steps)
    model.eval()
    for step in range(steps):
        x, y = _batch(step)
        session.before_step()
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        session.after_backward()
        if session.should_step():
            opt.step()
        session.after_optimizer_step()
    session.finish()
    model.eval()


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("algorithm,settings", [("magnitude", {"schedule": "oneshot", "end_fraction": 0.0}),
                                                ("rpg", {"frequency": 1, "end_fraction": 1.0})])
@pytest.mark.parametrize("name", list(MODELS))
def test_unstructured(name, algorithm, settings):
    h = TORCH.wrap(_model(name), SHAPE, name)
    algo = make_algorithm(algorithm, sparsity=0.5, **settings)
    _train(h, algo, 1)
    weights = h.weights_numpy()
    total = zeros = 0
    for layer, mask in algo.masks.items():
        m = h.ops.to_numpy(mask) > 0.5
        w = weights[layer]
        assert not w[~m].any(), f"{name}: pruned weights of {layer} are not zero"
        total += m.size
        zeros += int((~m).sum())
    assert algo.masks and abs(zeros / total - 0.5) < 0.01, (name, zeros / total)
    assert np.isfinite(h.predict(_batch()[0].numpy())).all()


def _groups_or_refusal(name, h):
    try:
        return find_channel_groups(h)
    except ModelError as e:
        assert name in REFUSAL_OK, f"{name}: channel groups refused: {e}"
        assert str(e)
        return None


@pytest.mark.parametrize("name", list(MODELS))
def test_groups(name):
    h = TORCH.wrap(_model(name), SHAPE, name)
    groups = _groups_or_refusal(name, h)
    if groups is None:
        return
    layers = {l.name: l for l in h.layers}
    covered = {}
    for g in groups:
        assert g.size >= 1
        if not g.prunable:
            assert getattr(g, "reason", "x"), f"{name}: group {g.name} is not prunable and says not why"
        offsets = getattr(g, "out_offsets", {})
        for p in g.producers + g.depthwise:
            first = offsets.get(p, 0)
            assert 0 <= first and first + g.size <= layers[p].out_channels
            covered.setdefault(p, []).append((first, g.size))
    for layer, parts in covered.items():  # each layer's outputs fall into its groups exactly once
        idx = np.concatenate([np.arange(a, a + n) for a, n in parts])
        assert np.array_equal(np.sort(idx), np.arange(layers[layer].out_channels)), (name, layer)
    assert any(g.prunable for g in groups), f"{name}: no prunable channel group"


@pytest.mark.parametrize("name", list(MODELS))
def test_channel_baseline_half_macs_compacts_exactly(name):
    h = TORCH.wrap(_model(name), SHAPE, name)
    x = _batch(3)[0].numpy()
    try:
        algo = make_algorithm("channel", macs_kept=0.5).bind(h, 1)
        algo.decide()  # the masks are on the model: this is the masked model
        masked_out = h.predict(x)
        small = TORCH.compact(h, algo.channel_keep)
    except ModelError as e:
        assert name in REFUSAL_OK, f"{name}: refused: {e}"
        return
    weights = h.weights_numpy()
    for g in algo.groups:  # the weights say which channels went: their producer rows are zero
        if g.name not in algo.channel_keep:
            continue
        gone = np.setdiff1d(np.arange(g.size), algo.channel_keep[g.name])
        first = getattr(g, "out_offsets", {})
        for p in g.producers:
            assert not weights[p][gone + first.get(p, 0)].any(), (name, p)
    dense = count_model(h.layers, weights, h.state_numpy())["dense_macs"]
    got = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
    assert got <= 0.5 * dense + 1, (name, got / dense)
    assert _rel(small.predict(x), masked_out) <= 1e-4, name


def _short_run(h, algorithm, steps=2):
    _train(h, algorithm, steps)
    return algorithm


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_channel_algorithms_on_real_cnns(name):
    """DSA, sDprun and PreCropping run on torchvision CNNs and their channel decisions compact
    into a model that computes what the pruned model computes."""
    x = _batch(5)[0].numpy()
    # DSA: gates searched on held-out batches, then fixed; two steps
    h = TORCH.wrap(_model(name), SHAPE, name)
    dsa = make_algorithm("dsa", budget=0.5, end_fraction=0.5)

    def held_out():
        i = 10
        while True:
            xb, yb = _batch(i)
            yield xb.numpy(), yb.numpy()
            i += 1
    dsa.validation = held_out()
    _short_run(h, dsa)
    assert dsa.channel_keep and any(len(v) < g.size for g in dsa.groups for k, v in dsa.channel_keep.items()
                                    if k == g.name)
    small = TORCH.compact(h, dsa.channel_keep)
    assert _rel(small.predict(x), h.predict(x)) <= 1e-4
    # sDprun, channels pruned jointly per group
    h = TORCH.wrap(_model(name), SHAPE, name)
    sd = make_algorithm("sdprun", coupling="channel", c=0.005)
    _short_run(h, sd)
    if sd.channel_keep:
        small = TORCH.compact(h, sd.channel_keep)
        assert _rel(small.predict(x), h.predict(x)) <= 1e-4
    # PreCropping: scored at initialisation, the narrow model built before training
    h = TORCH.wrap(_model(name), SHAPE, name)
    pc = make_algorithm("precrop", score="synflow", rounds=2, sparsity=0.5)
    narrow = pc.prepare(h, TORCH, [tuple(t.numpy() for t in _batch(0))], seed=0)
    assert sum(l.numel for l in narrow.layers) < sum(l.numel for l in h.layers)
    assert narrow.predict(x).shape == (2, 10)
