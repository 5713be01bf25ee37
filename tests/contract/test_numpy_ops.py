"""NumpyOps (the host implementation of the op contract) passes the same op cases as the
framework backends, against the same NumPy-independent references."""
import pytest

from prunekit.conformance import runner
from prunekit.conformance.cases import all_cases
from prunekit.contract.numpy_ops import NumpyOps


class NumpyBackend:
    NAME = "numpy"
    Ops = NumpyOps


@pytest.mark.parametrize("case", [c for c in all_cases() if c.group == "ops" and c.name != "ops/gradients"],
                         ids=lambda c: c.name)
def test_numpy_ops_pass_the_op_cases(case):
    row = runner.compare_outputs(case, "numpy vs reference", case.run(NumpyBackend), case.reference())
    assert row.passed, runner.format_table([row])


def test_numpy_ops_have_no_autograd():
    with pytest.raises(NotImplementedError):
        NumpyOps().value_and_grad(lambda: 0.0, {})
