"""Prune with MindSpore's high-level ``Model.train`` in GRAPH_MODE, Golden Stick style.

``Pruner("rpg", ...)`` is applied to the network (``apply``), gives the train cell and the
callbacks for your own ``Model(...).train(...)`` (masks and the rank term live in the compiled
graph as Parameters), and ``convert`` gives the pruned network, exported to MindIR and reloaded.
RPG (rank-based adversarial pruning) at 90 % here; any prunekit algorithm plugs in the same way.

    python examples/mindspore_model_train.py [--quick]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import mindspore.dataset as msds  # noqa: E402
import mindspore.nn as nn  # noqa: E402
from mindspore.train import Model  # noqa: E402

import prunekit.backends.mindspore  # noqa: E402,F401
from prunekit.backends.mindspore.integrations import Pruner  # noqa: E402
from prunekit.backends.mindspore.models import build_model  # noqa: E402
from prunekit.app import data  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a few steps only (used by the tests)")
    args = p.parse_args(argv)
    ds = data.load_dataset("cifar10", train_limit=256 if args.quick else 2000, test_limit=10)
    batch, epochs = 32, 1 if args.quick else 2
    x, y = next(iter(data.batches(ds.x_train, ds.y_train, len(ds.y_train), seed=0, mean=ds.mean, std=ds.std)))
    dataset = msds.NumpySlicesDataset({"image": x, "label": y.astype(np.int32)}, shuffle=False).batch(batch)
    total_steps = epochs * dataset.get_dataset_size()

    ms.set_context(mode=ms.GRAPH_MODE)
    pruner = Pruner("rpg", total_steps, input_shape=(3, 32, 32), model_name="resnet20",
                    sparsity=0.9, frequency=max(1, total_steps // 4), end_fraction=0.75)
    net = pruner.apply(build_model("resnet20"))
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
    model = Model(pruner.train_network(nn.CrossEntropyLoss(), optimizer))
    model.train(epochs, dataset, callbacks=pruner.callbacks(), dataset_sink_mode=True)  # unsunk on CPU

    weights = pruner.handle.weights_numpy()
    sparsity = 1 - sum(np.count_nonzero(w) for w in weights.values()) / sum(w.size for w in weights.values())
    print(f"measured sparsity {sparsity:.2%}; RPG ranks k of the first layers: "
          f"{dict(list(pruner.algorithm.ranks.items())[:4])}")
    assert abs(sparsity - 0.9) < 1e-3

    pruned = pruner.convert()  # unstructured: the trained network, pruned weights exactly zero
    pruned.set_train(False)
    sample = ms.Tensor(x[:2].astype(np.float32))
    ms.export(pruned, sample, file_name="rpg_resnet20", file_format="MINDIR")
    reloaded = nn.GraphCell(ms.load("rpg_resnet20.mindir"))
    assert np.allclose(reloaded(sample).asnumpy(), pruned(sample).asnumpy(), atol=1e-5)
    print("exported rpg_resnet20.mindir and reloaded it: same outputs")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return sparsity


if __name__ == "__main__":
    main()
