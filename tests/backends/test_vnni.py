"""quadllm.backends.vnni: the weight layout against its definition, the kernel's exact integer sums
(where it builds here), the operator under torch.compile, and the reasons it does not run."""

from __future__ import annotations

import pytest
import torch

from quadllm.backends import vnni


def unpack_reference(packed: torch.Tensor) -> torch.Tensor:
    """The layout's definition read back, element by element: column 64b + j of row n is the low
    nibble (n even) or the high one (n odd) of packed[n // 4, b, (n % 4) // 2, j], minus 8. Returns
    the padded codes [4 x tiles, 64 x blocks]."""
    tiles, blocks = packed.shape[:2]
    codes = torch.empty(tiles * 4, blocks * 64, dtype=torch.int8)
    for n in range(tiles * 4):
        for b in range(blocks):
            for j in range(64):
                byte = int(packed[n // 4, b, (n % 4) // 2, j])
                codes[n, 64 * b + j] = ((byte >> 4) if n % 2 else (byte & 0xF)) - 8
    return codes


@pytest.mark.parametrize("n,k", [(5, 64), (3, 1), (8, 100), (2, 200)])
def test_pack_follows_the_layout_and_pads_with_zero_codes(n, k):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = vnni.pack_w4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 3) // 4, (k + 63) // 64, 2, 64)
    padded = unpack_reference(packed)
    assert torch.equal(padded[:n, :k], codes)
    assert not padded[n:].any() and not padded[:, k:].any()


@pytest.mark.parametrize("n,k", [(5, 64), (3, 1), (8, 100), (1, 200)])
def test_pack_w8_follows_the_layout_and_pads_with_zero_codes(n, k):
    """Column 64b + j of row n is packed[n // 4, b, n % 4, j] - 128."""
    codes = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
    packed = vnni.pack_w8(codes)
    tiles, blocks = (n + 3) // 4, (k + 63) // 64
    assert packed.dtype == torch.uint8 and packed.shape == (tiles, blocks, 4, 64)
    padded = torch.empty(tiles * 4, blocks * 64, dtype=torch.int16)
    for row in range(tiles * 4):
        for b in range(blocks):
            for j in range(64):
                padded[row, 64 * b + j] = int(packed[row // 4, b, row % 4, j]) - 128
    assert torch.equal(padded[:n, :k], codes.to(torch.int16))
    assert not padded[n:].any() and not padded[:, k:].any()
    with pytest.raises(ValueError, match="int8"):
        vnni.pack_w8(codes.int())


@pytest.mark.parametrize("n,r", [(16, 64), (5, 72), (33, 1)])
def test_pack_f16_follows_the_layout(n, r):
    """Column k of row 16b + j is packed[b, k, j]; rows past N are zero; float16 holds the values or not."""
    w = torch.randn(n, r, generator=torch.Generator().manual_seed(n)).half().float()
    packed = vnni.pack_f16(w)
    assert packed.dtype == torch.float16 and packed.shape == ((n + 15) // 16, r, 16)
    for row in range(packed.shape[0] * 16):
        got = packed[row // 16, :, row % 16].float()
        assert torch.equal(got, w[row]) if row < n else not got.any()
    assert vnni.holds_in_f16(w) and not vnni.holds_in_f16(w + 1e-6)


def test_pack_refuses_codes_outside_int4():
    with pytest.raises(ValueError, match="-8..7"):
        vnni.pack_w4(torch.full((2, 64), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        vnni.pack_w4(torch.zeros(64, dtype=torch.int8))


needs_kernel = pytest.mark.skipif(vnni.vnni_unavailable_reason() is not None,
                                  reason=f"the VNNI kernel does not run here: {vnni.vnni_unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (3, 128, 8), (6, 192, 13), (9, 64, 4), (4, 130, 16), (2, 1, 3),
                                   (1, 576, 960), (5, 33, 1)])
def test_the_kernel_gives_the_exact_integer_sums(m, k, n):
    """Every row-block (4) and column-block (4) remainder, widths off the 64-column block, the full INT8 range."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    got = vnni.w4a8_mm(x, vnni.pack_w4(codes), n)
    assert got.dtype == torch.int32 and torch.equal(got, x.int() @ codes.int().t())
    # a non-contiguous x (a column slice, as the outlier split makes) gives the same sums
    wide = torch.randint(-128, 128, (m, k + 3), generator=g, dtype=torch.int8)
    assert torch.equal(vnni.w4a8_mm(wide[:, 3:], vnni.pack_w4(codes), n), wide[:, 3:].int() @ codes.int().t())


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (3, 128, 8), (6, 192, 13), (2, 1, 3), (1, 896, 1001), (5, 33, 1)])
def test_the_int8_kernel_gives_the_exact_integer_sums(m, k, n):
    """Both operands over the full INT8 range (-128 too), every remainder, a non-contiguous x."""
    g = torch.Generator().manual_seed(m * 1000 + k + 7)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randint(-128, 128, (m, k + 2), generator=g, dtype=torch.int8)[:, 2:]
    got = vnni.w8a8_mm(x, vnni.pack_w8(codes), n)
    assert got.dtype == torch.int32 and torch.equal(got, x.int() @ codes.int().t())
    extreme = torch.full((n, k), -128, dtype=torch.int8)  # the largest magnitudes the sums can reach
    assert torch.equal(vnni.w8a8_mm(torch.full((m, k), -128, dtype=torch.int8), vnni.pack_w8(extreme), n),
                       torch.full((m, n), 128 * 128 * k, dtype=torch.int32))


@needs_kernel
@pytest.mark.parametrize("m,r,n", [(1, 64, 576), (3, 72, 1000), (6, 64, 17), (5, 1, 3), (9, 8, 32)])
def test_the_float16_kernel_gives_the_products_summed_in_float32(m, r, n):
    """Against float64 sums of the same products: within float32 rounding (r additions); exact for
    small integers, whose float32 sums are exact in any order."""
    g = torch.Generator().manual_seed(m + r + n)
    w = torch.randn(n, r, generator=g).half().float()
    x = torch.randn(m, r + 2, generator=g)[:, 2:]  # a column slice, as the outlier split makes
    got = vnni.f16_mm(x, vnni.pack_f16(w), n)
    ref = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - ref).abs() <= 2 ** -23 * r * (x.abs().double() @ w.abs().double().t()) + 1e-30).all()
    wi, xi = torch.randint(-50, 50, (n, r), generator=g).float(), torch.randint(-50, 50, (m, r), generator=g).float()
    assert torch.equal(vnni.f16_mm(xi, vnni.pack_f16(wi), n), xi @ wi.t())


@needs_kernel
def test_the_kernel_refuses_a_layout_of_another_shape():
    packed = vnni.pack_w4(torch.zeros(4, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="do not fit K"):
        vnni.w4a8_mm(torch.zeros(1, 128, dtype=torch.int8), packed, 4)
    with pytest.raises(RuntimeError, match="do not fit n"):
        vnni.w4a8_mm(torch.zeros(1, 64, dtype=torch.int8), packed, 5)
    with pytest.raises(RuntimeError, match=r"packed must be contiguous uint8 \[N/4, K/64, 4, 64\]"):
        vnni.w8a8_mm(torch.zeros(1, 64, dtype=torch.int8), packed, 4)  # an INT4 layout


@needs_kernel
def test_the_operator_runs_in_a_compiled_graph():
    codes = torch.randint(-8, 8, (24, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = vnni.pack_w4(codes)

    packed8 = vnni.pack_w8(codes * 16)

    packed16 = vnni.pack_f16(codes.float()[:, :8])

    def f(x):
        q = (x / x.abs().amax(-1, keepdim=True) * 127).round().to(torch.int8)
        return (vnni.w4a8_mm(q, packed, 24).float() * 0.5 + vnni.w8a8_mm(q, packed8, 24).float()
                + vnni.f16_mm(x[:, :8], packed16, 24))

    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.compile(f, fullgraph=True, dynamic=False)(x), f(x))


def test_the_environment_and_the_cpu_decide_first(monkeypatch):
    monkeypatch.setenv(vnni.KERNEL_ENV, "torch")
    assert vnni.vnni_unavailable_reason() == "QUADLLM_INT4_KERNEL=torch"
    monkeypatch.setenv(vnni.KERNEL_ENV, "fast")
    with pytest.raises(vnni.KernelChoiceError, match="not one of auto, torch"):
        vnni.vnni_unavailable_reason()
    monkeypatch.setenv(vnni.KERNEL_ENV, "auto")
    monkeypatch.setattr(vnni, "cpu_has_vnni", lambda: False)
    assert vnni.vnni_unavailable_reason() == "this CPU has no AVX512-VNNI"


def test_a_failed_build_gives_its_first_line(monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'quadllm_vnni_gemv'\ng++: not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    assert vnni.build_kernel() == "the VNNI kernel did not build: Error building extension 'quadllm_vnni_gemv'"


def test_the_build_folder_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = vnni.build_directory()
    assert folder.parent == tmp_path and torch.__version__ in folder.name


def test_only_a_stale_build_lock_is_removed(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    assert not vnni.clear_stale_lock(tmp_path)  # none there
    lock.touch()
    assert not vnni.clear_stale_lock(tmp_path) and lock.exists()  # a build under way
    old = time.time() - vnni.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert vnni.clear_stale_lock(tmp_path) and not lock.exists()
