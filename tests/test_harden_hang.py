"""Issue 15, item 1: a codebook view with an astronomical entry count (an expanded view that costs
no memory) made the code-width loop shift by 64 or more and spin forever. Each call runs in a fresh
interpreter under a timeout, so a regression fails instead of hanging the suite."""
from __future__ import annotations

import pytest

from hardening import run_python

SETUP = """
import torch, vecinfer
huge = torch.empty(0, 1, 4).expand(0, 2**62 + 1, 4)  # 2**62 + 1 centroids, no memory
x = torch.randn(2, 64)
"""

CALLS = {
    "vq_encode": "vecinfer.vq_encode(x, huge)",
    "vq_decode": "vecinfer.vq_decode(torch.zeros(2, 16, dtype=torch.uint8), huge, head_dim=64)",
    "attention": ("vecinfer.attention(torch.randn(1, 2, 1, 64), torch.zeros(1, 2, 16, 16, dtype=torch.uint8), "
                  "torch.zeros(1, 2, 16, 16, dtype=torch.uint8), torch.tensor([[0, 1, 0]], dtype=torch.int32), "
                  "huge, huge)"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_astronomical_codebook_is_rejected_not_hung(name):
    code = SETUP + f"""
try:
    {CALLS[name]}
except ValueError as e:
    print("ValueError:", e)
"""
    result = run_python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ValueError:" in result.stdout and "codebook" in result.stdout, result.stdout + result.stderr
