"""What only the PyTorch backend has; everything both backends must do is in
``test_backend_behaviour.py``.

State names are ``state_dict``'s (without ``num_batches_tracked``); ``value_and_grad`` and
``stop_gradient`` leave autograd's own fields alone; string paddings are refused by discovery.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from prunekit.backends.torch import model_handle  # noqa: E402
from prunekit.backends.torch.layers import TorchModelHandle  # noqa: E402
from prunekit.backends.torch.ops import TorchOps  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402

OPS = TorchOps()


def test_state_names_are_the_state_dict_s():
    h = model_handle("resnet20", seed=0)
    names = set(h.state_numpy())
    assert not any(k.endswith("num_batches_tracked") for k in names)
    assert names == {k for k in h.model.state_dict() if not k.endswith("num_batches_tracked")}


def test_autograd_fields_left_alone():
    """``stop_gradient`` detaches; ``value_and_grad`` returns gradients without filling ``.grad``."""
    p = torch.ones(3, requires_grad=True)
    assert not OPS.stop_gradient(p * 2).requires_grad
    params = {"w": OPS.parameter(np.arange(3.0), "w"), "unused": OPS.parameter(np.ones(2), "unused")}
    loss, grads = OPS.value_and_grad(lambda: (params["w"] ** 2).sum(), params)
    np.testing.assert_array_equal(OPS.to_numpy(grads["w"]), [0.0, 2.0, 4.0])
    assert all(p.grad is None for p in params.values())


def test_string_padding_refused():
    """PyTorch's ``padding="same"`` has no fixed size before a forward; discovery refuses it by name."""
    with pytest.raises(ModelError, match="'0'.*same"):
        TorchModelHandle(nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")), (3, 8, 8), "same_pad")
