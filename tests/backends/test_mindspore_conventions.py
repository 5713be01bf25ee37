"""MindSpore's padding conventions in discovery, TRP's surgery and compaction.

Convs with ``pad_mode`` ``"same"`` (MindSpore's default), ``"valid"`` and ``"pad"`` (symmetric
and asymmetric), strides 1 and 2, odd and even kernels, dilation, on odd and even inputs: every
one is discovered; its decomposition (both schemes, full rank, so the factors must compose to
the original exactly) and its compaction (half the channels kept) compute what the original /
the masked model compute, within 1e-4 relative. What cannot be reproduced is refused by name.
"""
import itertools

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
import mindspore.nn as nn  # noqa: E402

from prunekit.algorithms.trp import plan_decompositions  # noqa: E402
from prunekit.backends.mindspore import BACKEND  # noqa: E402
from prunekit.backends.mindspore.layers import MindSporeModelHandle, conv_pads, conv_padding, same_pads  # noqa: E402
from prunekit.decisions.channel_groups import find_channel_groups, masked_state  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402

RTOL = 1e-4
#: (pad_mode, padding) of the conv under test; "pad" with a 4-tuple is (top, bottom, left, right)
PADS = [("same", 0), ("valid", 0), ("pad", 1), ("pad", (0, 1, 2, 1))]
GEOMETRY = [(3, 1, 1), (3, 2, 1), (2, 2, 1), (4, 1, 1), (1, 2, 1), (3, 2, 2)]  # kernel, stride, dilation


class Net(nn.Cell):
    """stem -> conv under test -> BN -> ReLU -> conv (same, stride 2) -> global pool -> dense."""

    def __init__(self, pad_mode, padding, kernel, stride, dilation):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, pad_mode="same", has_bias=True)
        self.conv = nn.Conv2d(8, 12, kernel, stride, pad_mode=pad_mode, padding=padding, dilation=dilation,
                              has_bias=True)
        self.bn = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.tail = nn.Conv2d(12, 6, 3, 2)
        self.fc = nn.Dense(6, 5)

    def construct(self, x):
        x = self.relu(self.bn(self.conv(self.stem(x))))
        return self.fc(self.tail(x).mean(axis=(2, 3)))


def _randomised(handle, seed=0):
    rng = np.random.default_rng(seed)
    state = handle.state_numpy()
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        else:
            state[k] = rng.normal(0, 0.5, v.shape).astype(np.float32)
    handle.load_state_numpy(state)
    return handle


def _close(ref, out):
    assert np.abs(ref).max() > 1e-2
    err = np.abs(ref - out).max() / np.abs(ref).max()
    assert err <= RTOL, err


def test_same_padding_is_mindspores():
    """:func:`same_pads` is the padding MindSpore's "same" applies: an explicitly padded conv
    with the same weights gives the same output, odd and even sizes, kernels, strides."""
    rng = np.random.default_rng(0)
    for size, (k, s, d) in itertools.product((7, 8), GEOMETRY):
        same = nn.Conv2d(2, 3, k, s, pad_mode="same", dilation=d)
        pads = conv_pads("c", same, (size, size + 1))
        assert pads[:2] == same_pads(size, k, s, d) and pads[2:] == same_pads(size + 1, k, s, d)
        explicit = nn.Conv2d(2, 3, k, s, pad_mode="pad", padding=pads, dilation=d)
        explicit.weight.set_data(same.weight.data)
        x = ms.Tensor(rng.standard_normal((1, 2, size, size + 1)).astype(np.float32))
        np.testing.assert_allclose(explicit(x).asnumpy(), same(x).asnumpy(), rtol=1e-5, atol=1e-5)
    assert same_pads(32, 3, 2, 1) == (0, 1) and same_pads(33, 3, 2, 1) == (1, 1) and same_pads(8, 4, 1, 1) == (1, 2)


def test_conv_padding_modes_and_refusals():
    conv = lambda **kw: nn.Conv2d(4, 4, 3, **kw)  # noqa: E731
    assert conv_padding("c", conv(pad_mode="pad", padding=2)) == (2, 2)
    assert conv_padding("c", conv(pad_mode="pad", padding=(1, 1, 2, 2))) == (1, 2)
    assert conv_pads("c", conv(pad_mode="pad", padding=(0, 1, 2, 3)), (8, 8)) == (0, 1, 2, 3)
    assert conv_padding("c", conv(pad_mode="valid")) == (0, 0)
    assert conv_padding("c", conv(), (8, 8)) == (1, 1)            # MindSpore's default "same"
    assert conv_pads("c", conv(stride=2), (8, 9)) == (0, 1, 1, 1)  # asymmetric "same": accepted
    bad = conv()
    bad.pad_mode = "reflect"
    with pytest.raises(ModelError, match="'layer3.conv'.*reflect"):
        conv_pads("layer3.conv", bad, (8, 8))


@pytest.mark.parametrize("pad_mode,padding", PADS, ids=lambda v: str(v).replace(" ", ""))
def test_decomposed_and_compacted_equal_the_original(pad_mode, padding):
    for size, (k, s, d) in itertools.product((7, 8), GEOMETRY):
        if pad_mode == "valid" and (k - 1) * d >= size:
            continue
        label = f"{pad_mode} {padding} size {size} kernel {k} stride {s} dilation {d}"
        build = lambda: _randomised(MindSporeModelHandle(Net(pad_mode, padding, k, s, d), (3, size, size)))  # noqa: E731
        x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
        handle = build()
        info = handle.layer("conv")
        assert info.stride == (s, s) and info.kernel_size == (k, k), label
        ref = handle.predict(x)
        # compaction: half the channels of every group, against the masked model
        groups = find_channel_groups(handle)
        keep = {g.name: np.arange(0, g.size, 2) for g in groups if g.prunable}
        assert keep, label
        small = BACKEND.compact(handle, keep)
        assert small.layer("conv").out_channels == 6, label
        masked = build()
        masked.load_state_numpy(masked_state(handle.state_numpy(), groups, keep))
        _close(masked.predict(x), small.predict(x))
        if min(k, k) == 1:
            continue  # TRP leaves 1x1 convs alone
        for scheme in ("channel", "spatial"):
            h = build()
            decs = plan_decompositions(h, scheme, threshold=0.0, layers=["conv"])
            dec = BACKEND.apply_decompositions(h, decs)
            assert "conv.0" in dict(dec.model.cells_and_names()), label
            try:
                _close(ref, dec.predict(x))
            except AssertionError as e:
                raise AssertionError(f"{label} {scheme}: {e}") from None


DEVICE_SCRIPT = r"""
import os, mindspore as ms
from mindspore._c_expression import DeviceManagerConf
calls = []
real_set_device = ms.set_device
ms.set_device = lambda *a, **k: (calls.append(a), real_set_device(*a, **k))[1]
os.environ.pop("PRUNEKIT_MS_DEVICE", None)
ms.set_context(device_target="CPU")         # the user's choice, made the older way, before the import
import prunekit.backends.mindspore
from prunekit.backends.mindspore.runtime import configure_process
from prunekit.errors import ConfigError
# prunekit did not pick a device over it (this CPU-only machine cannot load another device, so
# the choice itself is CPU; set_device would have made any later set_context choice fail)
assert calls == [] and not DeviceManagerConf.get_instance().is_device_enable(), calls
ms.set_context(device_target="CPU")          # and the user may still choose after the import
os.environ["PRUNEKIT_MS_DEVICE"] = "cpu"     # the environment's choice is applied with set_device
configure_process()
assert calls == [("CPU",)] and ms.get_context("device_target") == "CPU", calls
os.environ["PRUNEKIT_MS_DEVICE"] = "gpu"     # contradicting set_device: refused by name
try:
    configure_process()
    raise SystemExit("no error")
except ConfigError as e:
    assert "PRUNEKIT_MS_DEVICE='gpu'" in str(e) and "set_device chose CPU" in str(e), e
os.environ["PRUNEKIT_MS_DEVICE"] = "tpu"
try:
    configure_process()
    raise SystemExit("no error")
except ConfigError as e:
    assert "'tpu'" in str(e) and "CPU, GPU or Ascend" in str(e), e
print("device ok")
"""


def test_the_users_device_choice_is_respected():
    """``set_context(device_target=...)`` before or after the import is left alone (the backend
    used to call ``set_device("CPU")`` over it, whatever the context said); ``PRUNEKIT_MS_DEVICE`` is applied; a contradiction
    with ``set_device`` or an unknown name is refused naming the variable and its value."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PRUNEKIT_MS_DEVICE"}
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "device ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
