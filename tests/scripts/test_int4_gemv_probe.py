"""scripts/int4_gemv_probe.py: the probe's VNNI kernel gives the exact integer sums (where it can be
built here), and its table."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
probe = pytest.importorskip("int4_gemv_probe")


@pytest.mark.skipif(not probe.has_vnni() or shutil.which("ninja") is None or shutil.which("c++") is None,
                    reason="needs AVX512-VNNI, a C++ compiler and ninja")
def test_the_kernel_gives_the_exact_integer_sums():
    ext = probe.build()
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((1, 64, 5), (3, 128, 8), (6, 192, 13), (9, 64, 4)):  # every row-block and activation-block remainder
        codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)  # INT8 codes, the full range
        assert torch.equal(ext.mm(x, ext.pack(codes)), x.int() @ codes.int().t())
    with pytest.raises(RuntimeError):
        ext.pack(torch.zeros(2, 48, dtype=torch.int8))  # widths must be multiples of 64


def test_the_table_shows_every_row():
    row = {"model": "SmolLM2", "linear": "down", "k": 1536, "n": 576, "rows": 1, "exact": True,
           "torch_op_sums_exact": False, "vnni_us": 20.0, "torch_int4pack_us": 40.0, "speedup": 2.0,
           "vnni_weight_gbs": 22.1}
    md = probe.render([row], {"invocation": "python scripts/int4_gemv_probe.py", "date": "2026-12-07", "machine": "m"})
    assert "| SmolLM2 | down | 1536 | 576 | 1 | 20.0 | 40.0 | 2.0x | 22.1 | True | False |" in md
