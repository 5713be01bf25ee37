"""Case ``training/magnitude_resnet20_cifar10``: a few steps of gradual magnitude pruning on
real CIFAR-10 from identical weights and batches: losses, masks and weights."""
from __future__ import annotations

from typing import List

import numpy as np

from .base import Case, Outputs, Tol


TRAIN_STEPS = 6
TRAIN_LR = 0.01


def _training_run(backend) -> Outputs:
    from prunekit.app import data
    from prunekit.algorithms.magnitude import MagnitudeConfig, MagnitudePruner

    ds = data.load_dataset("cifar10", train_limit=64, test_limit=10)
    handle = backend.model_handle("resnet20", ds.num_classes, ds.in_channels, ds.image_size, seed=11)
    algo = MagnitudePruner(MagnitudeConfig(sparsity=0.8, frequency=2, end_fraction=0.8, scope="global"))
    trainer = backend.Trainer(handle, algo, "sgd", TRAIN_LR, 0.9, 5e-4, total_steps=TRAIN_STEPS, lr_schedule="constant")
    losses = []
    it = data.batches(ds.x_train, ds.y_train, 16, seed=3, epoch=0, augment=False, mean=ds.mean, std=ds.std)
    for step, (x, y) in zip(range(TRAIN_STEPS), _cycle(it, ds)):
        losses.append(float(trainer.train_step(x, y)))
    trainer.finish()
    weights = np.concatenate([handle.ops.to_numpy(handle.weight(l.name)).reshape(-1) for l in handle.layers])
    return {"loss_first_step": np.array(losses[:1]), "loss": np.array(losses),
            "mask": weights != 0, "weight": weights}


def _cycle(first, ds):
    from prunekit.app import data
    yield from first
    epoch = 1
    while True:
        yield from data.batches(ds.x_train, ds.y_train, 16, seed=3, epoch=epoch, augment=False, mean=ds.mean, std=ds.std)
        epoch += 1


def cases() -> List[Case]:
    return [Case("training/magnitude_resnet20_cifar10", "training", _training_run, None,
                 # Training is chaotic at float32 precision: a ReLU input of -4e-6 on one
                 # backend and +3e-6 on the other changes gradients by 1e-2 relative, and a
                 # weight on the threshold flips its mask. So the losses must agree closely,
                 # masks and weights in all but a few entries (torch against torch with 1 and
                 # 2 threads already differs in a handful of masks).
                 # Hence: the first loss tight, then 1 % on the loss trajectory, >= 99.9 % of all
                 # masks equal and >= 99.5 % of all weights within 1e-3 after 6 steps.
                 {"loss_first_step": Tol("close", atol=1e-5, rtol=1e-5),
                  "loss": Tol("close", atol=1e-3, rtol=1e-2), "mask": Tol("agree", min_agreement=0.999),
                  "weight": Tol("mostly_close", atol=1e-3, min_agreement=0.995)})]
