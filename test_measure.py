"""Tests of measure.py."""
import pytest
import torch

import measure


def test_peak_memory_sees_an_allocation():
    measure.release_freed_memory()  # PeakMemory trims on entry too: measure the base after a trim
    before = measure.proc_status("VmRSS")
    if before is None:
        pytest.skip("no /proc/self/status")
    with measure.PeakMemory(torch.device("cpu"), base=before) as pm:
        x = torch.ones(50_000_000, dtype=torch.uint8)  # 50 MB, touched
        del x
    assert pm.peak >= 45_000_000, pm.peak
