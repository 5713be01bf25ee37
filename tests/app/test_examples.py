"""The examples run as a user would run them (quick settings) and check their own results."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/<file>


@pytest.mark.parametrize("script, args", [
    ("torch_custom_loop.py", []),
    ("mindspore_functional_loop.py", ["--quick"]),
    ("mindspore_model_train.py", ["--quick"]),
    ("plan_across_backends.py", []),
    ("lightning_callback.py", ["--quick", "--out", "lightning-out"]),
])
def test_example_runs(script, args, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)] + args, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
