"""AVX512-VNNI INT4 x INT8 and INT8 x INT8 GEMMs for the few rows of a decode step
(``quadllm::w4a8_mm``, ``quadllm::w8a8_mm``), and a float32 x float16 one for the outlier columns
(``quadllm::f16_mm``).

``csrc/vnni_gemv.cpp`` computes the exact int32 sums ``x @ qwᵀ`` of INT8 activation codes ``x``
[M, K] and weight codes ``qw`` [N, K]: INT4 packed two per byte (:func:`pack_w4`), faster than
torch's ``aten._weight_int4pack_mm_for_cpu`` at the rows of a decode step, whose sums are also
rounded to bfloat16 (``scripts/int4_gemv_probe.py``, results/int4_gemv_probe.md), or INT8
(:func:`pack_w8`). ``cpu-int4`` uses the first where it runs, the ``w8a8`` head
(:mod:`quadllm.backends.head`) the second. :func:`f16_mm` multiplies float32 inputs by float16
weights (:func:`pack_f16`): cpu-int4's outlier columns, which checkpoints store in float16, read
at half the bytes of a float32 copy with the same products.

It is compiled once per machine, at first use, by ``torch.utils.cpp_extension`` (the system's C++
compiler and ninja; the build is kept under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, see :func:`build_directory`)
and registered as a torch operator with a shape function, so ``torch.compile`` calls it as one
opaque op. Where the CPU lacks VNNI, the build fails, or ``QUADLLM_INT4_KERNEL=torch`` asks for it,
:func:`vnni_unavailable_reason` says why and ``cpu-int4`` runs torch's op instead (the head:
``torch._int_mm``, the same sums).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import cache
from pathlib import Path

import torch

from ..errors import QuadllmError

__all__ = ["KERNEL_ENV", "KernelChoiceError", "build_directory", "build_kernel", "clear_stale_lock", "cpu_has_vnni",
           "f16_mm", "holds_in_f16", "pack_f16", "pack_w4", "pack_w8", "vnni_unavailable_reason", "w4a8_mm", "w8a8_mm"]

log = logging.getLogger(__name__)

#: the environment variable that picks the kernels of cpu-int4 and the w8a8 head: ``auto`` (default:
#: this module's where they run) or ``torch``
KERNEL_ENV = "QUADLLM_INT4_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "vnni_gemv.cpp"
NAME = "quadllm_vnni_gemv"
#: a build lock older than this was left by a killed build (a build takes seconds)
STALE_LOCK_S = 600.0
#: -fopenmp: at::parallel_for is inline OpenMP code, serial without it; the libgomp it needs is the
#: one torch already loaded (same soname), so the kernel shares torch's thread pool
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
#: the kernel's column block and its tile of output rows
BLOCK, TILE = 64, 4
#: the output columns of one block of f16_mm's layout
F16_BLOCK = 16


@cache
def cpu_has_vnni() -> bool:
    """Whether this CPU reports AVX512-VNNI (Linux's /proc/cpuinfo; False elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        return "avx512_vnni" in cpuinfo.read_text()
    except OSError:
        return False


def pack_w4(codes: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes [N, K] (-8..7) in the kernel's layout, uint8 [ceil(N / 4), ceil(K / 64), 2, 64]:
    zero codes pad N to a multiple of 4 and K to one of 64; ``packed[t, b, p, j]`` holds column
    64b + j of row 4t + 2p (+ 8) in its low nibble and of row 4t + 2p + 1 (+ 8) in its high one.
    (A thread then reads its tiles of four rows as one sequential stream.)"""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("INT4 codes must lie in -8..7")
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int16) + 8, (0, -k % BLOCK, 0, -n % TILE), value=8)
    rows = padded.reshape(-1, 2, 2, padded.shape[1] // BLOCK, BLOCK)  # [tile, pair, row of pair, block, j]
    nibbles = rows[:, :, 0] | (rows[:, :, 1] << 4)  # [tile, pair, block, j]
    return nibbles.transpose(1, 2).to(torch.uint8).contiguous()


def pack_w8(codes: torch.Tensor) -> torch.Tensor:
    """Signed INT8 codes [N, K] (-128..127) in the kernel's layout, uint8 [ceil(N / 4), ceil(K / 64), 4, 64]:
    zero codes pad N to a multiple of 4 and K to one of 64; ``packed[t, b, r, j]`` holds column
    64b + j of row 4t + r, + 128."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int16) + 128, (0, -k % BLOCK, 0, -n % TILE), value=128)
    return padded.reshape(-1, TILE, padded.shape[1] // BLOCK, BLOCK).transpose(1, 2).to(torch.uint8).contiguous()


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """Float weights [N, r] in :func:`f16_mm`'s layout, half [ceil(N / 16), r, 16]: ``packed[b, k, j]``
    is column k of row 16b + j in float16 (zero rows pad N). Values that float16 does not hold
    exactly are rounded: check first where that matters (:func:`holds_in_f16`)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, r], got {tuple(weight.shape)}")
    n, r = weight.shape
    padded = torch.nn.functional.pad(weight.detach().to(torch.float16), (0, 0, 0, -n % F16_BLOCK))
    return padded.reshape(-1, F16_BLOCK, r).transpose(1, 2).contiguous()


def holds_in_f16(weight: torch.Tensor) -> bool:
    """Whether float16 holds every value of ``weight`` exactly (so :func:`pack_f16` loses nothing)."""
    w = weight.detach()
    return bool(torch.equal(w.to(torch.float16).to(w.dtype), w))


class KernelChoiceError(QuadllmError, ValueError):
    """``QUADLLM_INT4_KERNEL`` names no kernel."""


def w4a8_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [M, n] = ``x @ qwᵀ`` for int8 codes ``x`` [M, K] and ``packed`` = :func:`pack_w4` (qw [n, K]);
    only after :func:`vnni_unavailable_reason` returned None."""
    return torch.ops.quadllm.w4a8_mm(x, packed, n)


def w8a8_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [M, n] = ``x @ qwᵀ`` for int8 codes ``x`` [M, K] and ``packed`` = :func:`pack_w8` (qw [n, K]);
    only after :func:`vnni_unavailable_reason` returned None. K up to 65,000 (int32 sums)."""
    return torch.ops.quadllm.w8a8_mm(x, packed, n)


def f16_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [M, n] = ``x @ wᵀ`` for float32 ``x`` [M, r] and ``packed`` = :func:`pack_f16` (w [n, r]);
    only after :func:`vnni_unavailable_reason` returned None."""
    return torch.ops.quadllm.f16_mm(x, packed, n)


def _fake_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.int32)


def _fake_f16_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


@cache
def _register_fake() -> None:
    """The operators' shape functions, for torch.compile (once per process: a second one is refused)."""
    for op in ("quadllm::w4a8_mm", "quadllm::w8a8_mm"):
        torch.library.register_fake(op)(_fake_mm)
    torch.library.register_fake("quadllm::f16_mm")(_fake_f16_mm)


def build_directory() -> Path:
    """Where the kernel is built: under ``TORCH_EXTENSIONS_DIR`` (torch's default build root without
    it), one folder per torch and Python version, since the library links against that torch."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR", "").strip() or get_default_build_root()
    return Path(root) / f"{NAME}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"


def clear_stale_lock(folder: Path, older_than_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock left by a build that was killed (older than ``older_than_s``): torch's
    builder otherwise waits for it forever. Returns whether one was removed."""
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < older_than_s:
        return False
    log.warning("cpu-int4: removing a stale build lock %s (%.0f s old)", lock, age)
    lock.unlink(missing_ok=True)
    return True


def build_kernel() -> str | None:
    """Build (or find built), load and check the kernel: None, or why it cannot run. Call it through
    :func:`vnni_unavailable_reason`, which does it once per process."""
    from torch.utils.cpp_extension import load  # setuptools and the build machinery: only to build

    t0 = time.perf_counter()
    log.info("building (or loading the kept build of) quadllm's AVX512-VNNI kernels")
    try:
        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(folder)
        load(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
             is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, SystemExit) as exc:  # no compiler or ninja, a read-only cache
        lines = str(exc).strip().splitlines()
        return f"the VNNI kernel did not build: {lines[0] if lines else type(exc).__name__}"
    _register_fake()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (13, 200), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (5, 200), generator=g, dtype=torch.int8)
    codes8 = torch.randint(-128, 128, (13, 200), generator=g, dtype=torch.int8)
    # small integers: f16_mm's float32 sums are then exact in any order
    w16, xf = codes.to(torch.float16), x.float()
    if not (torch.equal(w4a8_mm(x, pack_w4(codes), 13), x.int() @ codes.int().t())
            and torch.equal(w8a8_mm(x, pack_w8(codes8), 13), x.int() @ codes8.int().t())
            and torch.equal(f16_mm(xf, pack_f16(w16), 13), xf @ w16.float().t())):
        return "the VNNI kernel built but gave wrong sums on this machine"
    log.info("the VNNI kernels are ready (%.1f s)", time.perf_counter() - t0)
    return None


_build_once = cache(build_kernel)


def vnni_unavailable_reason() -> str | None:
    """None where :func:`w4a8_mm` and :func:`w8a8_mm` run here and are wanted, else why not:
    ``QUADLLM_INT4_KERNEL`` (read at each call; a value it does not know raises
    :class:`KernelChoiceError`), the CPU, then the build and an exactness check (once per process)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch"):
        raise KernelChoiceError(f"{KERNEL_ENV}={choice!r} is not one of auto, torch")
    if choice == "torch":
        return f"{KERNEL_ENV}=torch"
    if not cpu_has_vnni():
        return "this CPU has no AVX512-VNNI"
    return _build_once()
