"""The conformance suite under pytest: every case on both backends, compared, must pass;
and the command itself reports failures with a non-zero exit and a saved summary."""
import json

import numpy as np
import pytest

from prunekit.conformance import runner
from prunekit.conformance.cases import Case, Tol, all_cases

BACKENDS = ["torch", "mindspore"]


@pytest.mark.parametrize("case_name", [c.name for c in all_cases()])
def test_case_passes_on_both_backends(case_name):
    rows = runner.run_cases(BACKENDS, select=case_name, echo=lambda *a: None)
    rows = [r for r in rows if r.case == case_name]
    comparisons = {r.comparison for r in rows}
    assert "mindspore vs torch" in comparisons, comparisons
    failed = [r for r in rows if not r.passed]
    assert not failed, runner.format_table(failed)


def test_compare_rules():
    a = np.array([1.0, 2.0, np.nan])
    assert runner.compare(a, a.copy(), Tol("exact")) == (0.0, True)
    assert runner.compare(a, a + 1e-9, Tol("exact"))[1] is False
    assert runner.compare(a, a + 1e-9, Tol("close", atol=1e-6))[1] is True
    assert runner.compare(np.array([1, 1, 0, 1]), np.array([1, 1, 1, 1]), Tol("agree", min_agreement=0.8))[1] is False
    assert runner.compare(np.zeros(3), np.zeros(4), Tol("close", atol=1.0))[1] is False
    assert runner.compare(np.array([0.0, np.nan]), np.array([0.0, 1.0]), Tol("close", atol=1.0))[1] is False
    mostly = Tol("mostly_close", atol=1e-3, min_agreement=0.75)
    assert runner.compare(np.array([0, 0, 0, 5.0]), np.zeros(4), mostly) == (0.75, True)
    assert runner.compare(np.array([0, 0, 5, 5.0]), np.zeros(4), mostly)[1] is False


def test_command_fails_and_saves_summary_when_a_case_fails(monkeypatch, tmp_path):
    def broken(backend):
        ops = backend.Ops()
        # a deliberately backend-dependent answer: the suite must catch it
        return {"value": np.array([1.0 if ops.name == "torch" else 2.0])}

    monkeypatch.setattr(runner, "all_cases", lambda: [Case("planted/disagreement", "ops", broken, None, {}, Tol("exact"))])
    status = runner.main(BACKENDS, str(tmp_path))
    assert status == 1
    rows = json.load(open(tmp_path / "summary.json"))
    assert rows and rows[0]["passed"] is False and rows[0]["comparison"] == "mindspore vs torch"
    assert "FAIL" in open(tmp_path / "summary.md").read()


def test_command_passes_on_a_subset(tmp_path):
    from prunekit.app.cli import main
    assert main(["conformance", "--out", str(tmp_path), "-k", "decisions/magnitude_masks/exact_ties"]) == 0
    text = open(tmp_path / "summary.md").read()
    assert "mindspore vs torch" in text and "FAIL" not in text
