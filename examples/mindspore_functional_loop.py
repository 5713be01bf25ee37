"""Prune a model inside your own MindSpore training loop (the functional ``value_and_grad`` idiom).

ResNet-20 on a CIFAR-10 subset, 80 % global magnitude pruning with the cubic schedule. The
session sits between the gradient computation and the optimizer; everything else is plain
MindSpore.

    python examples/mindspore_functional_loop.py [--quick]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import mindspore.nn as nn  # noqa: E402
import mindspore.ops as ops  # noqa: E402

import prunekit.backends.mindspore  # noqa: E402,F401  (chooses the device: CPU unless PRUNEKIT_MS_DEVICE says otherwise)
from prunekit.backends.mindspore import MindSporeModelHandle, PruningSession  # noqa: E402
from prunekit.backends.mindspore.models import build_model  # noqa: E402
from prunekit.app import data  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.app.report import build_report, format_report  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a few steps only (used by the tests)")
    args = p.parse_args(argv)
    ds = data.load_dataset("cifar10", train_limit=320 if args.quick else 2000, test_limit=200)
    epochs, batch = (1, 32) if args.quick else (2, 100)
    total_steps = epochs * data.num_batches(len(ds.y_train), batch)

    net = build_model("resnet20")
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
    handle = MindSporeModelHandle(net, input_shape=(3, 32, 32), model_name="resnet20")
    algorithm = make_algorithm("magnitude", sparsity=0.8, schedule="cubic", frequency=max(1, total_steps // 8),
                               end_fraction=0.7)
    session = PruningSession(handle, algorithm, optimizer, total_steps)

    def forward(x, y):
        return ops.cross_entropy(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)
    net.set_train(True)
    for epoch in range(epochs):
        for x, y in data.batches(ds.x_train, ds.y_train, batch, seed=0, epoch=epoch, augment=True,
                                 mean=ds.mean, std=ds.std):
            session.before_step()
            loss, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype("int32")))
            grads = session.transform_gradients(grads)
            if session.should_step():
                optimizer(grads)
            session.after_optimizer_step()
        print(f"epoch {epoch}: loss {float(loss.asnumpy()):.3f}, sparsity {algorithm.current_sparsity:.0%}")
    session.finish()

    net.set_train(False)
    correct = sum(int((net(ms.Tensor(x)).asnumpy().argmax(1) == y).sum())
                  for x, y in data.batches(ds.x_test, ds.y_test, 100, shuffle=False, drop_last=False,
                                           mean=ds.mean, std=ds.std))
    report = build_report(handle, {"test": correct / len(ds.y_test)}, {"algorithm": "magnitude"})
    print(format_report(report, max_layers=5))
    assert abs(report["totals"]["prunable_sparsity"] - 0.8) < 1e-3, "the measured sparsity should be the target"
    return report


if __name__ == "__main__":
    main()
