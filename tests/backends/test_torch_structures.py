"""Channel groups and compaction on the structures of real PyTorch CNNs (issue #11): squeeze-excite
gates, concatenations and splits, grouped convs, GroupNorm and LayerNorm, channels-last and token
layouts (refused, naming the layer), compaction refused where it would differ from the masked
model; bfloat16/float16 and channels_last models, ``torch.compile`` names, and the session's
``load_state_dict``. Tiny hand-built modules, plus one torchvision model with squeeze-excite."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from prunekit.backends.torch.compact import compact  # noqa: E402
from prunekit.backends.torch.layers import TorchModelHandle  # noqa: E402
from prunekit.decisions.channel_groups import check_keep, find_channel_groups, fit_keep, masked_state  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402

SHAPE = (3, 8, 8)


def _by_name(groups):
    return {g.name: g for g in groups}


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
    return model.eval()


def _even_keep(groups):
    return {g.name: fit_keep(g, (np.arange(g.size) % 2 == 0).astype(float), g.size // 2)
            for g in groups if g.prunable and g.size > 1}


def _compacts_exactly(model, shape=SHAPE, atol=1e-4):
    """Compact to every other channel; the result equals the masked model and the original is unchanged."""
    h = TorchModelHandle(_randomise(model), shape, "m")
    groups = find_channel_groups(h)
    keep = _even_keep(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(h, keep)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    masked = TorchModelHandle(copy.deepcopy(model), shape, "m")
    masked.load_state_numpy(masked_state(h.state_numpy(), groups, keep))
    x = np.random.default_rng(1).standard_normal((3,) + shape).astype(np.float32)
    ref, out = masked.predict(x), small.predict(x)
    assert np.abs(ref).max() > 1e-3
    assert np.abs(ref - out).max() <= atol * np.abs(ref).max()
    assert sum(p.numel() for p in small.model.parameters()) < sum(p.numel() for p in model.parameters())
    return groups, small


class SE(nn.Module):
    """conv -> BN -> ReLU -> x * sigmoid(excite(relu(squeeze(mean(x))))) -> conv -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.proj = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        s = x.mean((2, 3), keepdim=True)
        x = x * torch.sigmoid(self.excite(torch.relu(self.squeeze(s))))
        return self.fc(torch.relu(self.proj(x)).mean((2, 3)))


def test_squeeze_excite_gate_couples_the_excite_conv():
    groups, small = _compacts_exactly(SE())
    g = _by_name(groups)
    assert g["conv"].producers == ("conv", "excite") and g["conv"].consumers == ("squeeze", "proj")
    assert g["conv"].prunable and g["conv"].norms == ("bn",)
    hidden = g["squeeze"]  # the squeeze's hidden channels: a group of their own
    assert hidden.prunable and hidden.producers == ("squeeze",) and hidden.consumers == ("excite",)
    assert "excite" not in g  # no longer a group with no consumers
    assert small.model.excite.weight.shape == (4, 2, 1, 1) and small.model.squeeze.weight.shape == (2, 4, 1, 1)


class Cat(nn.Module):
    """Two producers concatenated, read by a BN and a conv; a split (chunk) read by two convs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 1)
        self.d = nn.Conv2d(4, 4, 1)
        self.e = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = torch.relu(self.c(y))
        p, q = y.chunk(2, dim=1)
        y = torch.cat([torch.relu(self.d(p)), torch.relu(self.e(q))], 1)
        return self.fc(y.mean((2, 3)))


def test_concatenation_and_split_map_channels_at_offsets():
    groups, small = _compacts_exactly(Cat())
    g = _by_name(groups)
    assert g["a"].prunable and g["a"].in_offsets == {"bn": 0, "c": 0} and g["a"].size == 6
    assert g["b"].prunable and g["b"].in_offsets == {"bn": 6, "c": 6} and g["b"].size == 4
    # c's output is split in two halves, each its own group, at offsets 0 and 4 of c's output
    assert g["c@0"].out_offsets == {"c": 0} and g["c@0"].consumers == ("d",)
    assert g["c@4"].out_offsets == {"c": 4} and g["c@4"].consumers == ("e",)
    assert g["d"].in_offsets == {"fc": 0} and g["e"].in_offsets == {"fc": 4}
    assert small.model.c.weight.shape == (4, 5, 1, 1) and small.model.bn.num_features == 5


class Grouped(nn.Module):
    def __init__(self, norm_groups=4):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.gn = nn.GroupNorm(norm_groups, 16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.gn(self.a(x)))
        x = torch.relu(self.bn(self.g(x)))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_grouped_conv_balanced_and_groupnorm_whole_groups():
    g = _by_name(find_channel_groups(TorchModelHandle(Grouped(), SHAPE, "m")))
    # a's channels feed a GroupNorm (groups of 4) and a grouped conv (4 groups): both rules at once
    assert not g["a"].prunable and "GroupNorm" in g["a"].reason
    assert g["g"].prunable and g["g"].balanced == 4 and g["g"].whole == 1
    with pytest.raises(ModelError, match="same number"):
        check_keep(list(g.values()), {"g": [0, 1, 4]})
    groups, small = _compacts_exactly(Grouped())  # a's channels whole, g's output halved per group
    assert small.model.g.groups == 4 and small.model.g.weight.shape == (8, 4, 3, 3)
    model = Grouped()
    model.gn = nn.BatchNorm2d(16)
    groups, small = _compacts_exactly(model)  # both sides halved, two of four channels in each group
    assert _by_name(groups)["a"].balanced == 4
    assert small.model.g.groups == 4 and small.model.g.weight.shape == (8, 2, 3, 3)


class GN(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.relu(self.gn(self.a(x))))).mean((2, 3)))


def test_groupnorm_sliced_by_whole_groups_layernorm_over_channels_refused():
    g = _by_name(find_channel_groups(TorchModelHandle(GN(4), SHAPE, "m")))["a"]
    assert g.prunable and g.whole == 4 and g.norms == ("gn",)
    with pytest.raises(ModelError, match="whole groups"):
        check_keep([g], {"a": [0, 1, 4, 5]})
    keep = fit_keep(g, np.arange(16.0), 8)  # the two highest-scoring groups of 4
    assert keep.tolist() == list(range(8, 16))
    groups, small = _compacts_exactly(GN(4))
    assert small.model.gn.num_groups == 2 and small.model.gn.num_channels == 8
    one = _by_name(find_channel_groups(TorchModelHandle(GN(1), SHAPE, "m")))["a"]
    assert not one.prunable and "all its channels" in one.reason
    assert one.to_dict()["reason"] == one.reason


def test_tokens_and_channels_last_refused_naming_the_layer():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mlp = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (N, tokens, channels)
            return self.head(self.mlp(t).mean(1))

    with pytest.raises(ModelError, match="linear layer 'mlp'.*Unstructured pruning works"):
        find_channel_groups(TorchModelHandle(Tokens(), SHAPE, "tokens"))

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.head(y.mean((2, 3)))

    with pytest.raises(ModelError, match="norm 'norm' normalises the last axis"):
        find_channel_groups(TorchModelHandle(ChannelsLast(), SHAPE, "cl"))


def test_compaction_that_would_differ_from_the_masked_model_is_refused():
    class Shift(nn.Module):
        """softplus(0) != 0: a removed channel still feeds the next conv in the masked model."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.c(nn.functional.softplus(self.a(x)))).mean((2, 3)))

    model = Shift()
    h = TorchModelHandle(model, SHAPE, "shift")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"layer 'c' differs from the masked model's by .* \(tolerance 0.0001\)"):
        compact(h, {"a": [0, 2, 4, 6]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_wrap_and_compact(dtype):
    model = _randomise(SE()).to(getattr(torch, dtype))
    h = TorchModelHandle(model, SHAPE, "se")
    groups = find_channel_groups(h)
    small = compact(h, _even_keep(groups))
    assert small.model.conv.weight.dtype == getattr(torch, dtype) and small.model.conv.weight.shape[0] == 4
    assert np.isfinite(small.predict(np.ones((1,) + SHAPE, np.float32))).all()


def test_channels_last_survives_compaction():
    model = _randomise(SE()).to(memory_format=torch.channels_last)
    h = TorchModelHandle(model, SHAPE, "se")
    small = compact(h, _even_keep(find_channel_groups(h)))
    w = small.model.conv.weight
    assert w.shape[0] == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_compiled_model_shares_names_and_plans_with_its_original():
    model = SE()
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    a, b = TorchModelHandle(model, SHAPE, "se"), TorchModelHandle(compiled, SHAPE, "se")
    assert [l.name for l in a.layers] == [l.name for l in b.layers] and "_orig_mod" not in str(b.state_numpy())
    assert b.compiled is compiled and b.model is model
    keep = _even_keep(find_channel_groups(a))
    small = compact(b, keep)  # a plan made on the plain model applies to the compiled one
    assert small.model.conv.weight.shape[0] == 4


def test_torchvision_mobilenet_v3_small_groups_and_compaction():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v3_small(num_classes=10)
    groups, _ = _compacts_exactly(model, (3, 32, 32))
    g = _by_name(groups)
    se = g["features.0.0"]  # stem conv -> depthwise conv -> squeeze-excite -> projection
    assert se.producers == ("features.0.0", "features.1.block.1.fc2") and se.prunable
    assert se.depthwise == ("features.1.block.0.0",) and "features.1.block.1.fc1" in se.consumers
    assert g["features.1.block.1.fc1"].prunable and g["features.1.block.1.fc1"].consumers == ("features.1.block.1.fc2",)
    assert sum(x.prunable for x in groups) == len(groups) - 2  # all but the image and the logits
