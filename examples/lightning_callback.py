"""Prune inside PyTorch Lightning with one callback, then export the pruned model to ONNX.

``prunekit.backends.torch.integrations.PruningCallback`` drives any prunekit algorithm from Lightning's
hooks; the LightningModule, optimizer and data loader are yours. Here: ResNet-20 on a CIFAR-10
subset, RPG (rank-based adversarial pruning) at 80 % with its ``release`` semantics (which
skips the optimizer step before each mask update: the callback handles that too), then the
pruned network exported to ONNX and checked with onnxruntime.

    python examples/lightning_callback.py [--quick] [--out runs/example-lightning]
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402

from prunekit.backends.torch.export import export_onnx  # noqa: E402
from prunekit.backends.torch.integrations import PruningCallback  # noqa: E402
from prunekit.backends.torch.models import build_model  # noqa: E402
from prunekit.app import data  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.app.report import build_report, format_report  # noqa: E402


class CifarClassifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, lr: float):
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def loader(x, y, batch, shuffle, augment, ds, epochs=1):
    """The NumPy batches of prunekit.app.data as a DataLoader (each item is already a batch)."""
    items = [(torch.from_numpy(a), torch.from_numpy(b))
             for e in range(epochs)
             for a, b in data.batches(x, y, batch, seed=0, epoch=e, shuffle=shuffle, augment=augment,
                                      drop_last=shuffle, mean=ds.mean, std=ds.std)]
    return torch.utils.data.DataLoader(items, batch_size=None, shuffle=False)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a few steps only (used by the tests)")
    p.add_argument("--out", default=os.path.join("runs", "example-lightning"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ds = data.load_dataset("cifar10", train_limit=256 if args.quick else 4000, test_limit=100 if args.quick else 1000)
    epochs, batch = (1, 32) if args.quick else (4, 100)
    train = loader(ds.x_train, ds.y_train, batch, True, True, ds, epochs)
    steps = len(train)

    net = build_model("resnet20")
    algorithm = make_algorithm("rpg", sparsity=0.8, semantics="release", frequency=max(1, steps // 6),
                               end_fraction=0.7, partial_k=0.2)
    callback = PruningCallback(algorithm, module="net", input_shape=(3, 32, 32), model_name="resnet20")
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.quick)
    with warnings.catch_warnings():  # Lightning's DataLoader-worker advice
        warnings.simplefilter("ignore")
        trainer.fit(CifarClassifier(net, lr=0.05), train_dataloaders=train)

    handle = callback.handle
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in loader(ds.x_test, ds.y_test, 250, False, False, ds))
    report = build_report(handle, {"test": correct / len(ds.y_test)},
                          {"algorithm": "rpg", "target_sparsity": 0.8, "steps": trainer.global_step})
    print(format_report(report, max_layers=4))
    sparsity = report["totals"]["prunable_sparsity"]
    weights = handle.weights_numpy()
    exact = all(np.all(weights[n][algorithm.ops.to_numpy(m) == 0] == 0) for n, m in algorithm.masks.items())
    print(f"Lightning steps {trainer.global_step}; measured sparsity {sparsity:.2%}; masked weights exactly zero: {exact}")

    os.makedirs(args.out, exist_ok=True)
    x_check = next(iter(data.batches(ds.x_test, ds.y_test, 16, shuffle=False, mean=ds.mean, std=ds.std)))[0]
    onnx = export_onnx(handle, os.path.join(args.out, "resnet20_rpg.onnx"), x_check)
    print(f"ONNX: {onnx['path']}, onnxruntime vs PyTorch max |diff| {onnx['max_abs_diff']:.3g}")
    assert exact and abs(sparsity - 0.8) < 1e-3
    return sparsity


if __name__ == "__main__":
    main()
