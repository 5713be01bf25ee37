"""Make a pruning plan on PyTorch, replay it on the MindSpore twin, compare.

The plan (masks per layer name, saved as JSON + .npz) is plain data: it loads on either
backend and replays onto a freshly built model. The twins share parameter names, so the masks
land on the same weights; the script checks that they are identical and that the two pruned
models give the same logits.

    python examples/plan_across_backends.py
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import torch  # noqa: E402

import prunekit.backends.mindspore as pk_ms  # noqa: E402
import prunekit.backends.torch as pk_torch  # noqa: E402
from prunekit import PruningPlan  # noqa: E402
from prunekit.algorithms import apply_plan  # noqa: E402
from prunekit.algorithms.magnitude import MagnitudePruner  # noqa: E402


def main():
    src = pk_torch.model_handle("resnet20", seed=4)
    algorithm = MagnitudePruner(sparsity=0.9, schedule="oneshot").bind(src, total_steps=1)
    algorithm.update_masks(0.9)             # one global magnitude threshold, applied to the weights
    plan = algorithm.plan()
    path = os.path.join(tempfile.mkdtemp(), "plan")
    plan.save(path)

    dst = pk_ms.model_handle("resnet20", seed=4)  # a fresh twin with the same initial weights
    apply_plan(dst, PruningPlan.load(path))
    same = all(np.array_equal(src.weights_numpy()[n] != 0, dst.weights_numpy()[n] != 0) for n in plan.masks)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    src.model.eval()
    dst.model.set_train(False)
    with torch.no_grad():
        a = src.model(torch.from_numpy(x)).numpy()
    b = dst.model(ms.Tensor(x)).asnumpy()
    print(f"masks identical on both backends: {same}; max logit difference {np.abs(a - b).max():.2e}")
    assert same and np.abs(a - b).max() < 1e-4


if __name__ == "__main__":
    main()
