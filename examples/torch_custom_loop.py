"""Prune a model inside your own PyTorch training loop.

prunekit only needs four calls around the optimizer step; the model, optimizer, loss and
data loader are yours. Here: ResNet-20 on a CIFAR-10 subset, 80 % global magnitude pruning
with the cubic schedule, then the plan saved for replay on either backend.

    python examples/torch_custom_loop.py
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunekit.backends.torch import PruningSession, TorchModelHandle  # noqa: E402
from prunekit.backends.torch.models import build_model  # noqa: E402
from prunekit.app import data  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.app.report import build_report, format_report  # noqa: E402


def main():
    ds = data.load_dataset("cifar10", train_limit=2000, test_limit=500)
    model = build_model("resnet20")                       # any nn.Module with Conv2d / Linear layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs, batch = 2, 100
    total_steps = epochs * data.num_batches(len(ds.y_train), batch)

    handle = TorchModelHandle(model, input_shape=(3, 32, 32), model_name="resnet20")
    algorithm = make_algorithm("magnitude", sparsity=0.8, schedule="cubic", frequency=5, end_fraction=0.7)
    session = PruningSession(handle, algorithm, optimizer, total_steps)

    model.train()
    for epoch in range(epochs):
        for x, y in data.batches(ds.x_train, ds.y_train, batch, seed=0, epoch=epoch, augment=True,
                                 mean=ds.mean, std=ds.std):
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            session.before_step()                  # the schedule may update masks here
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            session.after_backward()               # gradients of pruned weights -> 0
            if session.should_step():
                optimizer.step()
            session.after_optimizer_step()         # pruned weights stay exactly 0
        print(f"epoch {epoch}: loss {loss.item():.3f}, sparsity {algorithm.current_sparsity:.0%}")
    session.finish()

    model.eval()
    with torch.no_grad():
        correct = sum(int((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).sum())
                      for x, y in data.batches(ds.x_test, ds.y_test, 250, shuffle=False, drop_last=False,
                                               mean=ds.mean, std=ds.std))
    report = build_report(handle, {"test": correct / len(ds.y_test)}, {"algorithm": "magnitude"})
    print(format_report(report, max_layers=5))
    paths = algorithm.plan().save(os.path.join("runs", "example-torch", "plan"))
    print("plan saved to", paths[0])
    assert abs(report["totals"]["prunable_sparsity"] - 0.8) < 1e-3, "the measured sparsity should be the target"
    return report


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
