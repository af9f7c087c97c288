"""Resident memory of this process: its peak, as every command and results file reports it, and
returning freed memory to the system."""

from __future__ import annotations

import ctypes
import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _glibc_function(name: str):
    """The C library's function ``name`` (glibc), or None where there is none."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory the allocator has freed back to the system (glibc ``malloc_trim``), so that
    the resident size of a long layer-by-layer run follows what it holds; no-op elsewhere."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


# glibc's mallopt parameter: allocations of at least this many bytes get their own mapping
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20


def map_large_allocations(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Give every allocation of at least ``threshold_bytes`` its own memory mapping (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), returned to the system as soon as it is freed. The setting
    holds for the rest of the process.

    glibc raises this threshold on its own, up to 32 MB, each time a mapped block is freed; a
    layer-by-layer run then carves its many temporaries of a few MB (GPTQ blocks, activation
    chunks) from the heap, where they fragment it and keep the resident size of each layer
    above what it holds. A fixed threshold stops that. Returns False where the C library has no
    ``mallopt`` (not glibc); the run then goes on with the allocator's default."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
