"""quadllm.io.memory: the allocator settings of layer-by-layer runs."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from quadllm.io.memory import map_large_allocations

# After freeing a 16 MB mapped block, glibc raises its mmap threshold past 16 MB, so 8 MB blocks
# come from the heap, unless the threshold was fixed first; mallinfo2's hblkhd counts mapped bytes.
_PROBE = """
import ctypes, sys
import torch
from quadllm.io.memory import map_large_allocations
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    assert map_large_allocations()
big = torch.empty(16 << 20, dtype=torch.uint8)
del big
keep = [torch.empty(8 << 20, dtype=torch.uint8) for _ in range(4)]
print(libc.mallinfo2().hblkhd)
"""


def _glibc_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallopt and mallinfo2)")
def test_map_large_allocations_keeps_megabyte_blocks_off_the_heap():
    mapped = {mode: int(subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout)
              for mode in ("default", "fixed")}
    # the four 8 MB tensors are mapped only with the fixed threshold
    assert mapped["fixed"] - mapped["default"] >= 4 * (8 << 20)


def test_map_large_allocations_rejects_a_non_positive_threshold():
    with pytest.raises(ValueError, match="positive"):
        map_large_allocations(0)

