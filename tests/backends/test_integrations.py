"""Framework integrations: the PyTorch Lightning callback and MindSpore's ``Model.train`` callback.

Lightning: a few steps of ``lightning.Trainer`` on real CIFAR-10 images give the target sparsity,
exact zeros, and the same masks and weights as the plain ``PruningSession`` loop on the same
batches (including RPG's release semantics, which skips optimizer steps). MindSpore:
``Model.train`` with ``PruningTrainOneStepCell`` + ``PruningCallback`` runs every algorithm and
matches the functional ``PruningSession`` loop.
"""
import warnings

import numpy as np
import pytest

from prunekit.app import data
from prunekit.algorithms import make_algorithm

STEPS, BATCH = 6, 16
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4

#: algorithm -> config small enough for a few steps (mask updates at steps 0, 2, 4)
CONFIGS = {
    "magnitude": dict(sparsity=0.8, frequency=2, end_fraction=0.75),
    "rpg": dict(sparsity=0.8, frequency=2, end_fraction=0.75, partial_k=0.2),
    "rpg-release": dict(sparsity=0.8, frequency=2, end_fraction=0.75, partial_k=0.2, semantics="release"),
    "trp": dict(energy=0.9, lam=3e-4),
}


def _algorithm(key):
    return make_algorithm(key.split("-")[0], **CONFIGS[key])


@pytest.fixture(scope="module")
def cifar_batches():
    ds = data.load_dataset("cifar10", train_limit=STEPS * BATCH, test_limit=10)
    batches = list(data.batches(ds.x_train, ds.y_train, BATCH, seed=0, mean=ds.mean, std=ds.std))
    assert len(batches) == STEPS
    return batches


def _sparsity(weights, names):
    total = sum(weights[n].size for n in names)
    return 1.0 - sum(np.count_nonzero(weights[n]) for n in names) / total


def _check_masks(algorithm, handle, target):
    weights = handle.weights_numpy()
    masks = {n: algorithm.ops.to_numpy(m) for n, m in algorithm.masks.items()}
    assert masks, "no layer was masked"
    for n, m in masks.items():
        assert np.all(weights[n][m == 0] == 0), f"{n}: masked weights are not exactly zero"
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.size for m in masks.values())
    assert abs((1 - kept / total) - target) <= 1.0 / total + 1e-12
    assert abs(_sparsity(weights, list(masks)) - target) <= 1.0 / total + 1e-12
    return masks


# ---------------------------------------------------------------------------- Lightning
def _lightning_fit(batches, algorithm):
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    import prunekit.backends.torch as bt
    from prunekit.backends.torch.integrations import PruningCallback

    class Classifier(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    net = bt.model_handle("resnet20", seed=0).model
    # batch_size=None: each item is already a batch (the plain loop's batches, in order)
    loader = torch.utils.data.DataLoader([(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches],
                                         batch_size=None, shuffle=False)
    callback = PruningCallback(algorithm, module="net", input_shape=(3, 32, 32), model_name="resnet20")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():  # Lightning's advice about DataLoader workers on a plain list
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(net), train_dataloaders=loader)
    assert trainer.global_step == len(batches)
    assert callback.session.step == len(batches)
    return callback, net


def _plain_loop(batches, algorithm):
    import torch
    import torch.nn.functional as F

    import prunekit.backends.torch as bt

    handle = bt.model_handle("resnet20", seed=0)
    model = handle.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    session = bt.PruningSession(handle, algorithm, optimizer, len(batches))
    skipped = 0
    for x, y in batches:
        session.before_step()
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        session.after_backward()
        if session.should_step():
            optimizer.step()
        else:
            skipped += 1
        session.after_optimizer_step()
    session.finish()
    return handle, skipped


@pytest.mark.parametrize("key", ["magnitude", "rpg-release", "trp"])
def test_lightning_callback_matches_plain_loop(cifar_batches, key):
    pytest.importorskip("lightning")
    algorithm = _algorithm(key)
    callback, net = _lightning_fit(cifar_batches, algorithm)
    assert "optimizer_step" not in vars(net), "the optimizer_step wrapper was left on the module"

    reference = _algorithm(key)
    plain, skipped = _plain_loop(cifar_batches, reference)
    if key == "rpg-release":
        assert skipped > 0, "the release schedule skipped no optimizer step: the skip path is untested"
    if "sparsity" in CONFIGS[key]:
        masks = _check_masks(algorithm, callback.handle, CONFIGS[key]["sparsity"])
        ref_masks = {n: reference.ops.to_numpy(m) for n, m in reference.masks.items()}
        assert sorted(masks) == sorted(ref_masks)
        for n in masks:
            np.testing.assert_array_equal(masks[n], ref_masks[n], err_msg=n)
    else:  # TRP: the same energy ranks, some of them truncating
        assert algorithm.ranks and algorithm.ranks == reference.ranks
        full = {l.name: min(l.weight_shape[0], int(np.prod(l.weight_shape[1:]))) for l in algorithm.layers}
        assert any(r < full[n] for n, r in algorithm.ranks.items()), "TRP truncated no layer"
    mine, theirs = callback.handle.state_numpy(), plain.state_numpy()
    for n in theirs:
        np.testing.assert_allclose(mine[n], theirs[n], rtol=0, atol=1e-6, err_msg=n)


def test_lightning_callback_rejects_bad_setup(cifar_batches):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    import torch

    import prunekit.backends.torch as bt
    from prunekit.backends.torch.integrations import PruningCallback
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="prunekit algorithm"):
        PruningCallback(object())

    class NoShape(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bt.model_handle("mnist_cnn", in_channels=1, image_size=28).model

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = NoShape()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PruningCallback(make_algorithm("magnitude", sparsity=0.5), module="net")])
    loader = torch.utils.data.DataLoader([(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))],
                                         batch_size=None)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="input_shape"):
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the callback refused to start"


# ---------------------------------------------------------------------------- MindSpore Model.train
MS_STEPS = 4


def _ms_functional(batches, algorithm):
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as msops

    import prunekit.backends.mindspore as bm

    handle = bm.model_handle("resnet20", seed=0)
    net = handle.model
    net.set_train(True)
    optimizer = nn.SGD(net.trainable_params(), learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)
    session = bm.PruningSession(handle, algorithm, optimizer, len(batches))

    def loss_fn(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, optimizer.parameters))
    skipped = 0
    for x, y in batches:
        session.before_step()
        _, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype(np.int32)))
        grads = session.transform_gradients(grads)
        if session.should_step():
            optimizer(grads)
        else:
            skipped += 1
        session.after_optimizer_step()
    session.finish()
    return handle, skipped


def _ms_model_train(batches, algorithm):
    import mindspore.dataset as msds
    import mindspore.nn as nn
    from mindspore.train import Model

    import prunekit.backends.mindspore as bm

    handle = bm.model_handle("resnet20", seed=0)
    net = handle.model
    optimizer = nn.SGD(net.trainable_params(), learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)
    session = bm.PruningSession(handle, algorithm, optimizer, len(batches))
    train_net = bm.PruningTrainOneStepCell(nn.WithLossCell(net, nn.CrossEntropyLoss()), optimizer, session)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches]).astype(np.int32)
    dataset = msds.NumpySlicesDataset({"image": x, "label": y}, shuffle=False).batch(BATCH)
    Model(train_net).train(1, dataset, callbacks=[bm.PruningCallback(session)], dataset_sink_mode=False)
    assert session.step == len(batches)
    return handle


@pytest.mark.parametrize("key", ["magnitude", "rpg", "rpg-release", "trp"])
def test_mindspore_model_train_runs_every_algorithm(cifar_batches, key):
    try:
        import prunekit.backends.mindspore  # noqa: F401
    except ImportError as e:
        pytest.skip(f"MindSpore unavailable: {e}")
    batches = cifar_batches[:MS_STEPS]
    algorithm = _algorithm(key)
    handle = _ms_model_train(batches, algorithm)
    reference = _algorithm(key)
    plain, skipped = _ms_functional(batches, reference)
    if key == "rpg-release":
        assert skipped > 0, "the release schedule skipped no optimizer step: the skip path is untested"
    if "sparsity" in CONFIGS[key]:
        masks = _check_masks(algorithm, handle, CONFIGS[key]["sparsity"])
        ref_masks = {n: reference.ops.to_numpy(m) for n, m in reference.masks.items()}
        assert sorted(masks) == sorted(ref_masks)
        for n in masks:
            np.testing.assert_array_equal(masks[n], ref_masks[n], err_msg=n)
    else:  # TRP: ranks chosen by the energy rule, the same in both loops
        assert algorithm.ranks and algorithm.ranks == reference.ranks
        full = {l.name: min(l.weight_shape[0], int(np.prod(l.weight_shape[1:]))) for l in algorithm.layers}
        assert any(r < full[n] for n, r in algorithm.ranks.items()), "TRP truncated no layer"
    mine, theirs = handle.state_numpy(), plain.state_numpy()
    for n in theirs:
        np.testing.assert_allclose(mine[n], theirs[n], rtol=0, atol=2e-5, err_msg=n)
