"""Tests of gpu_check.py: its --dry run goes through every step on this machine, so the first run on
a GPU cannot die on a typo."""
import pytest

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")

import gpu_check  # noqa: E402


def test_dry_run_goes_through_every_step(capsys):
    res = gpu_check.main(["--dry"])
    out = capsys.readouterr().out
    assert set(res["steps"]) == {"tests", "scoring", "decode", "bench"}
    assert res["steps"]["scoring"]["max_abs_diff"] < 1e-5  # the fused scorer equals the reference
    assert res["steps"]["decode"]["max_abs_diff"] < 1e-5
    assert "arguments parse" in res["steps"]["bench"] or "cuda" in res["device"].lower()
    assert out.startswith("gpu_check |") and "compressed / full" in out
