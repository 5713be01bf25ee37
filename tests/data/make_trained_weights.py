"""Regenerate ``resnet20_cifar10.npz``: ResNet-20 trained on real CIFAR-10 (PyTorch, CPU).

The rank-machinery tests need *trained* weights (their spectra decay, unlike random ones);
this script made the file in the repository:

    python tests/data/make_trained_weights.py [--epochs 3]
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import prunekit.backends.torch as bt  # noqa: E402
from prunekit.app import data  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet20_cifar10.npz"))
    args = p.parse_args()
    ds = data.load_dataset("cifar10")
    handle = bt.model_handle("resnet20", seed=0)
    steps = args.epochs * data.num_batches(len(ds.y_train), 128)
    trainer = bt.Trainer(handle, None, "sgd", 0.1, 0.9, 5e-4, total_steps=steps)
    for epoch in range(args.epochs):
        for x, y in data.batches(ds.x_train, ds.y_train, 128, seed=0, epoch=epoch, augment=True, mean=ds.mean, std=ds.std):
            trainer.train_step(x, y)
        _, acc = trainer.evaluate(data.batches(ds.x_test, ds.y_test, 500, shuffle=False, drop_last=False,
                                               mean=ds.mean, std=ds.std))
        print(f"epoch {epoch}: test accuracy {acc:.2%}", flush=True)
    np.savez_compressed(args.out, **handle.state_numpy())
    print("saved", args.out)


if __name__ == "__main__":
    main()
