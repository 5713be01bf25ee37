"""A plan made on one backend replays onto the other backend's twin with identical masks."""
import numpy as np
import pytest

from prunekit import PruningPlan
from prunekit.algorithms import apply_plan
from prunekit.algorithms.magnitude import MagnitudePruner
from prunekit.errors import PlanError
from prunekit.contract.backend import get_backend

CASES = [("resnet20", "unstructured", "global", 3, 32), ("mobilenetv2", "channel", "layer", 3, 32),
         ("mnist_cnn", "unstructured", "layer", 1, 28)]


@pytest.mark.parametrize("source, target", [("torch", "mindspore"), ("mindspore", "torch")])
@pytest.mark.parametrize("model, granularity, scope, channels, size", CASES)
def test_plan_replays_across_backends(source, target, model, granularity, scope, channels, size, tmp_path):
    src = get_backend(source).model_handle(model, 10, channels, size, seed=2)
    algo = MagnitudePruner(sparsity=0.7, granularity=granularity, scope=scope, schedule="oneshot").bind(src, 1)
    algo.update_masks(0.7)
    algo.plan().save(str(tmp_path / "plan"))

    dst = get_backend(target).model_handle(model, 10, channels, size, seed=5)  # other weights, same shapes
    before = dst.weights_numpy()
    apply_plan(dst, PruningPlan.load(str(tmp_path / "plan")))
    after = dst.weights_numpy()
    src_w = src.weights_numpy()
    for name in src_w:
        kept_src = src_w[name] != 0
        np.testing.assert_array_equal(after[name] != 0, kept_src & (before[name] != 0), err_msg=name)
        np.testing.assert_array_equal(after[name][kept_src], before[name][kept_src])


def test_plan_from_another_model_leaves_target_untouched(tmp_path):
    src = get_backend("torch").model_handle("resnet32", seed=0)
    algo = MagnitudePruner(sparsity=0.5, schedule="oneshot").bind(src, 1)
    algo.update_masks(0.5)
    algo.plan().save(str(tmp_path / "plan"))
    dst = get_backend("mindspore").model_handle("resnet20", seed=0)
    before = dst.state_numpy()
    with pytest.raises(PlanError, match="resnet32"):
        apply_plan(dst, PruningPlan.load(str(tmp_path / "plan")))
    after = dst.state_numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before)
