"""Channel dependency groups (prunekit.decisions.channel_groups): found from the model by the probe, identical on
both backends for the twin models, right for torchvision ResNet-18/50 and MobileNetV2, and
conservative (not prunable) where channels are coupled other than one to one."""
import numpy as np
import pytest

from prunekit.contract.backend import get_backend
from prunekit.decisions.channel_groups import INPUT_GROUP, binary_codes, classify, decode, find_channel_groups
from prunekit.errors import ModelError

TWINS = [("resnet20", 3, 32), ("mnist_cnn", 1, 28), ("vgg16", 3, 32), ("mobilenetv2", 3, 32)]


def _groups(backend_name, model, in_ch, size):
    h = get_backend(backend_name).model_handle(model, 10, in_ch, size, seed=0)
    return find_channel_groups(h)


def _by_name(groups):
    return {g.name: g for g in groups}


def test_decode_binary_codes():
    codes = binary_codes(6) > 0
    # a consumer reading channels in order, one reading them reversed, one mixing two
    changed = np.concatenate([codes, codes[:, ::-1], (codes[:, :1] | codes[:, 1:2])], axis=1)
    index, fed = decode(changed, 6)
    assert index[:6].tolist() == list(range(6))
    assert index[6:12].tolist() == list(range(5, -1, -1))
    assert index[12] == -1 and fed[12]
    assert classify(index[:6], fed[:6], 6, False) == ("same", 1)
    assert classify(index[6:12], fed[6:12], 6, False)[0] == "coupled"
    blocks = np.repeat(codes, 4, axis=1)  # a linear after a flatten: 4 columns per channel
    i2, f2 = decode(blocks, 6)
    assert classify(i2, f2, 6, True) == ("same", 4)
    assert classify(i2, f2, 6, False)[0] == "coupled"


@pytest.mark.parametrize("model,in_ch,size", TWINS)
def test_twin_groups_identical_on_both_backends(model, in_ch, size):
    try:
        ms = _groups("mindspore", model, in_ch, size)
    except Exception as e:  # pragma: no cover - MindSpore missing
        pytest.skip(f"mindspore unavailable: {e}")
    assert _groups("torch", model, in_ch, size) == ms


def test_resnet20_groups():
    g = _by_name(_groups("torch", "resnet20", 3, 32))
    assert list(g)[0] == INPUT_GROUP and not g[INPUT_GROUP].prunable and g[INPUT_GROUP].consumers == ("conv1",)
    # block-internal channels: conv1 -> bn1 -> conv2, prunable
    inner = g["layer2.1.conv1"]
    assert inner.prunable and inner.size == 32
    assert (inner.producers, inner.consumers, inner.norms) == (("layer2.1.conv1",), ("layer2.1.conv2",),
                                                                ("layer2.1.bn1",))
    assert sum(x.prunable for x in g.values()) == 9
    # residual stage: outputs added by identity shortcuts share a group; the option-A shortcut
    # zero-pads them into the next stage (channel i -> i + 8), which couples the stages: not prunable
    stage = g["conv1"]
    assert stage.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert "layer2.0.conv1" in stage.consumers and "layer1.2.bn2" in stage.norms and not stage.prunable
    last = g["layer3.0.conv2"]
    assert "fc" in last.consumers and last.spatial["fc"] == 1 and not last.prunable
    assert not g["fc"].prunable and g["fc"].consumers == ()


def test_mobilenetv2_and_mnist_groups():
    g = _by_name(_groups("torch", "mobilenetv2", 3, 32))
    exp = g["layers.1.conv1"]  # expansion conv -> depthwise conv -> projection
    assert exp.depthwise == ("layers.1.conv2",) and exp.norms == ("layers.1.bn1", "layers.1.bn2")
    assert exp.consumers == ("layers.1.conv3",) and exp.prunable
    res = g["layers.3.conv3"]  # projections added by identity shortcuts
    assert res.producers == ("layers.3.conv3", "layers.4.conv3", "layers.5.conv3") and res.prunable
    assert res.consumers == ("layers.4.conv1", "layers.5.conv1", "layers.6.conv1")
    conv_shortcut = g["layers.0.conv3"]
    assert conv_shortcut.producers == ("layers.0.conv3", "layers.0.shortcut.0")
    m = _by_name(_groups("torch", "mnist_cnn", 1, 28))
    assert m["conv2"].consumers == ("fc1",) and m["conv2"].spatial == {"fc1": 49} and m["conv2"].prunable
    assert m["fc1"].prunable and not m["fc2"].prunable


def _tv(name):
    tv = pytest.importorskip("torchvision")
    from prunekit.backends.torch.layers import TorchModelHandle
    return TorchModelHandle(getattr(tv.models, name)(num_classes=10), (3, 32, 32), name)


def test_torchvision_resnets():
    g = _by_name(find_channel_groups(_tv("resnet18")))
    stage2 = g["layer2.0.conv2"]
    assert stage2.producers == ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2") and stage2.prunable
    assert stage2.norms == ("layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2")
    assert stage2.consumers == ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0")
    assert g["conv1"].producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert len(g) == 14 and sum(x.prunable for x in g.values()) == 12
    g50 = _by_name(find_channel_groups(_tv("resnet50")))
    assert g50["layer4.0.conv3"].size == 2048 and "fc" in g50["layer4.0.conv3"].consumers
    assert g50["layer1.0.conv1"].consumers == ("layer1.0.conv2",)
    assert len(g50) == 39 and sum(x.prunable for x in g50.values()) == 37


def test_torchvision_mobilenet_v2():
    g = _by_name(find_channel_groups(_tv("mobilenet_v2")))
    first = g["features.0.0"]  # stem -> depthwise of the first block (no expansion) -> projection
    assert first.depthwise == ("features.1.conv.0.0",) and first.consumers == ("features.1.conv.1",)
    assert g["features.18.0"].consumers == ("classifier.1",)
    assert len(g) == 27 and not g["classifier.1"].prunable


def test_channel_shuffle_is_coupled_and_grouped_conv_balanced():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    from prunekit.backends.torch.layers import TorchModelHandle

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c = nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = torch.relu(self.b(x))  # b's output is read after a channel shuffle
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            x = self.c(self.g(x))
            return self.fc(x.mean((2, 3)))

    g = _by_name(find_channel_groups(TorchModelHandle(Shuffle(), (3, 8, 8), "shuffle")))
    assert g["a"].prunable and g["a"].consumers == ("b",)
    assert not g["b"].prunable and "permutes" in g["b"].reason  # read shuffled
    # a grouped conv's output: prunable, the same number of channels from each of its 2 groups
    assert g["g"].prunable and g["g"].balanced == 2 and g["g"].reason == ""
    assert g["c"].prunable and g["c"].consumers == ("fc",)


def test_deterministic_and_not_a_backend_handle():
    a = _groups("torch", "resnet20", 3, 32)
    assert a == _groups("torch", "resnet20", 3, 32)

    class Fake:
        layers = []
    with pytest.raises(ModelError, match="not a backend model handle"):
        find_channel_groups(Fake())
