"""Tests for quadllm.core.hadamard: constructions, orthogonal fallbacks and fast transforms."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from quadllm.core import hadamard as hd
from quadllm.core.hadamard import (
    OnlineTransform,
    dct_matrix,
    hadamard_factor_matrices,
    hadamard_factors,
    hadamard_matrix,
    has_hadamard,
    kron_transform,
    orthogonal_matrix,
    random_hadamard,
)

POW2_SMALL = [2**k for k in range(0, 13)]  # 1 .. 4096: checked densely
POW2_LARGE = [2**k for k in range(13, 17)]  # 8192 .. 65536: checked via kron_transform
NON_POW2_SMALL = [
    12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 108, 140, 148, 172, 576, 896, 1536, 3584, 4864
]
NON_POW2_LARGE = [8960, 9728, 14336, 18944]
NO_HADAMARD = [3, 6, 9, 14, 18]


def assert_hadamard(h: torch.Tensor, n: int) -> None:
    """Exact check: entries ±1 and H H^T = n I.

    The product is computed in float32, which is exact here: every partial sum
    is an integer of magnitude <= n < 2**24.
    """
    assert h.shape == (n, n)
    assert h.dtype == torch.float64
    assert bool(((h == 1) | (h == -1)).all()), "entries must be ±1"
    h32 = h.to(torch.float32)
    assert torch.equal(h32 @ h32.T, n * torch.eye(n, dtype=torch.float32))


def popcount_sign(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(-1) ** popcount(i & j), the natural-order Sylvester entry."""
    v = i & j
    bits = torch.zeros_like(v)
    while bool((v > 0).any()):
        bits += v & 1
        v = v >> 1
    return 1.0 - 2.0 * (bits % 2).to(torch.float64)


# ---------------------------------------------------------------------------
# Factorizations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [1]),
        (2, [2]),
        (256, [256]),
        (512, [32, 16]),
        (16384, [128, 128]),
        (65536, [256, 256]),
        (576, [36, 16]),
        (896, [28, 32]),
        (1536, [12, 128]),
        (3584, [28, 128]),
        (4864, [76, 64]),
        (8960, [140, 64]),
        (9728, [76, 128]),
        (14336, [28, 32, 16]),
        (18944, [148, 128]),
        (11008, [172, 64]),
    ],
)
def test_hadamard_factors_examples(n: int, expected: list[int]) -> None:
    assert hadamard_factors(n) == expected


@pytest.mark.parametrize("n", POW2_SMALL + POW2_LARGE + NON_POW2_SMALL + NON_POW2_LARGE)
def test_hadamard_factors_structure(n: int) -> None:
    factors = hadamard_factors(n)
    assert math.prod(factors) == n
    core, pow2 = factors[0], factors[1:]
    if n & (n - 1) == 0:  # power of two: only power-of-two factors
        pow2 = factors
    else:
        assert core & (core - 1) != 0 and core % 4 == 0
    for f in pow2:
        assert f & (f - 1) == 0 and 1 <= f <= 256
    assert pow2 == sorted(pow2, reverse=True)
    assert has_hadamard(n)


def test_factors_prefer_smallest_core() -> None:
    # 72 = 71 + 1 (Paley I) is a valid core of 72 and 576, but 36 is smaller.
    assert has_hadamard(72)
    assert hadamard_factors(72) == [36, 2]
    assert hadamard_factors(576)[0] == 36
    # 344 = 7**3 + 1 is a Paley order, but the smaller core 172 wins.
    assert hadamard_factors(344) == [172, 2]


@pytest.mark.parametrize("n", NO_HADAMARD)
def test_no_hadamard_raises(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=rf"order {n}.*multiples of 4.*supported orders"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match="supported orders"):
        hadamard_factors(n)
    with pytest.raises(ValueError):
        OnlineTransform.hadamard(n)


def test_uncovered_multiple_of_four_raises() -> None:
    # 92 = 4 * 23 has a Hadamard matrix (Williamson), but not from these constructions.
    assert not has_hadamard(92)
    with pytest.raises(ValueError, match="not covered.*supported orders"):
        hadamard_matrix(92)


def test_invalid_orders() -> None:
    for bad in (0, -4):
        assert not has_hadamard(bad)
        with pytest.raises(ValueError):
            hadamard_matrix(bad)
    with pytest.raises(TypeError):
        hadamard_matrix(4.0)  # type: ignore[arg-type]


def test_has_hadamard_only_for_valid_orders() -> None:
    for n in range(1, 1025):
        if n not in (1, 2) and n % 4 != 0:
            assert not has_hadamard(n), n
    # every power of two and every order listed as required
    assert all(has_hadamard(n) for n in POW2_SMALL + POW2_LARGE + NON_POW2_SMALL + NON_POW2_LARGE)


# ---------------------------------------------------------------------------
# Dense Hadamard matrices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", POW2_SMALL + NON_POW2_SMALL)
def test_hadamard_matrix_dense(n: int) -> None:
    assert_hadamard(hadamard_matrix(n), n)


def test_every_supported_order_up_to_600() -> None:
    supported = [n for n in range(1, 601) if has_hadamard(n)]
    assert len(supported) > 100
    for n in supported:
        assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43, 243, 343])
def test_paley1_including_prime_powers(q: int) -> None:
    assert_hadamard(hd._paley1(q), q + 1)


@pytest.mark.parametrize("q", [5, 9, 13, 25, 49, 81, 125])
def test_paley2_including_prime_powers(q: int) -> None:
    assert_hadamard(hd._paley2(q), 2 * (q + 1))


def test_sylvester_natural_order() -> None:
    n = 1024
    idx = torch.arange(n)
    expected = popcount_sign(idx[:, None], idx[None, :])
    assert torch.equal(hadamard_matrix(n), expected)


def test_dense_equals_kron_of_factors() -> None:
    for n in (576, 1536, 14336 // 16):
        mats = hadamard_factor_matrices(n)
        dense = mats[0]
        for m in mats[1:]:
            dense = torch.kron(dense, m)
        assert torch.equal(dense, hadamard_matrix(n))


def test_cache_returns_copies() -> None:
    h = hadamard_matrix(12)
    h.zero_()
    assert_hadamard(hadamard_matrix(12), 12)
    q = orthogonal_matrix(12)
    q.zero_()
    assert torch.equal(orthogonal_matrix(12), hadamard_matrix(12) / math.sqrt(12))
    f = hadamard_factors(576)
    f.append(3)
    assert hadamard_factors(576) == [36, 16]
    m = hadamard_factor_matrices(576)
    m[0].zero_()
    assert_hadamard(hadamard_factor_matrices(576)[0], 36)


# ---------------------------------------------------------------------------
# Large orders via kron_transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", POW2_LARGE + NON_POW2_LARGE)
def test_large_orders_via_kron_transform(n: int) -> None:
    factors = hadamard_factors(n)
    mats = hadamard_factor_matrices(n)
    for f, m in zip(factors, mats):
        assert_hadamard(m, f)
    normalized = [m / math.sqrt(f) for f, m in zip(factors, mats)]

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=gen, dtype=torch.float64)
    y = kron_transform(x, normalized)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    back = kron_transform(y, [m.T for m in normalized])
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    assert not torch.allclose(y, x)

    # A few columns of the implicit matrix: entries ±1/sqrt(n), orthonormal.
    cols = torch.tensor([0, 1, n // 3, n - 1])
    basis = torch.zeros(len(cols), n, dtype=torch.float64)
    basis[torch.arange(len(cols)), cols] = 1.0
    c = kron_transform(basis, normalized)  # row r = column cols[r] of H / sqrt(n)
    torch.testing.assert_close(c.abs(), torch.full_like(c, 1 / math.sqrt(n)), rtol=1e-12, atol=0)
    eye = torch.eye(len(cols), dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, eye, rtol=0, atol=1e-12)
    if n & (n - 1) == 0:  # natural Sylvester order survives the factorization
        expected = popcount_sign(torch.arange(n)[None, :], cols[:, None]) / math.sqrt(n)
        torch.testing.assert_close(c, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# Orthogonal matrices, DCT fallback, random Hadamard
# ---------------------------------------------------------------------------


def dct_reference(n: int) -> np.ndarray:
    """Orthonormal DCT-II (rows = basis vectors) from the textbook formula."""
    d = np.empty((n, n))
    for k in range(n):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        for i in range(n):
            d[k, i] = scale * math.cos(math.pi * k * (2 * i + 1) / (2 * n))
    return d


@pytest.mark.parametrize("n", [9, 14, 3, 5, 96 + 1])
def test_orthogonal_matrix_dct_fallback(n: int) -> None:
    assert not has_hadamard(n)
    q = orthogonal_matrix(n)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    np.testing.assert_allclose(q.numpy(), dct_reference(n), rtol=0, atol=1e-13)
    # DCT-II of a vector via an independent FFT-based computation (Makhoul).
    x = np.random.default_rng(n).standard_normal(n)
    v = np.concatenate([x[::2], x[1::2][::-1]])
    k = np.arange(n)
    coef = np.real(np.exp(-1j * np.pi * k / (2 * n)) * np.fft.fft(v))
    coef *= np.where(k == 0, math.sqrt(1.0 / n), math.sqrt(2.0 / n))
    np.testing.assert_allclose(q.numpy() @ x, coef, rtol=0, atol=1e-12)
    assert torch.equal(dct_matrix(n), q)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 172, 576])
def test_orthogonal_matrix_hadamard(n: int) -> None:
    q = orthogonal_matrix(n)
    assert torch.equal(q, hadamard_matrix(n) / math.sqrt(n))
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [12, 64, 9, 14])
def test_random_hadamard(n: int) -> None:
    r = random_hadamard(n, seed=0)
    assert r.dtype == torch.float64 and r.shape == (n, n)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(r, random_hadamard(n, seed=0))
    assert not torch.equal(r, random_hadamard(n, seed=1))
    # Convention: R = Q @ diag(s), i.e. column j of Q times a sign s_j.
    q = orthogonal_matrix(n)
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    assert torch.equal(r, q @ torch.diag(s))
    assert bool((s == 1).any() and (s == -1).any())


# ---------------------------------------------------------------------------
# kron_transform
# ---------------------------------------------------------------------------


def dense_kron(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("orders", [(3, 5), (4, 4), (2, 3, 4), (5, 1, 3), (7,)])
@pytest.mark.parametrize("batch", [(), (6,), (2, 5)])
def test_kron_transform_matches_dense(
    orders: tuple[int, ...], dtype: torch.dtype, batch: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(sum(orders) + len(batch))
    mats = [torch.randn(k, k, generator=gen, dtype=torch.float64) for k in orders]
    n = math.prod(orders)
    x = torch.randn(*batch, n, generator=gen, dtype=torch.float64).to(dtype)
    y = kron_transform(x, mats)
    ref = x @ dense_kron(mats).to(dtype).T
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_kron_transform_identity_factor_and_noncontiguous() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64).T  # (5, 12), non-contiguous
    ref = x @ torch.kron(m, torch.eye(4, dtype=torch.float64)).T
    torch.testing.assert_close(kron_transform(x, [m, 4]), ref, rtol=1e-12, atol=1e-12)
    ref2 = x @ torch.kron(torch.eye(4, dtype=torch.float64), m).T
    torch.testing.assert_close(kron_transform(x, [4, m]), ref2, rtol=1e-12, atol=1e-12)
    out = kron_transform(x, [3, 4])  # all identity: a copy
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_kron_transform_errors() -> None:
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="last dimension"):
        kron_transform(x, [torch.eye(3), torch.eye(3)])
    with pytest.raises(ValueError, match="square"):
        kron_transform(x, [torch.ones(2, 5)])
    with pytest.raises(TypeError):
        kron_transform(torch.ones(2, 4, dtype=torch.int64), [torch.eye(4)])


# ---------------------------------------------------------------------------
# OnlineTransform
# ---------------------------------------------------------------------------


def test_online_hadamard_576() -> None:
    t = OnlineTransform.hadamard(576)
    assert t.n == 576 and t.orders == [36, 16]
    d = t.dense()
    torch.testing.assert_close(d @ d.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(d, hadamard_matrix(576) / 24.0, rtol=1e-15, atol=0)
    x = torch.randn(3, 7, 576, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ d.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.transposed()(t(x)), x, rtol=1e-12, atol=1e-12)
    assert "n=576" in repr(t) and "factors=[36, 16]" in repr(t)


@pytest.mark.parametrize(("groups", "inner"), [(9, 64), (14, 8), (16, 4), (5, 1)])
def test_online_mixing(groups: int, inner: int) -> None:
    t = OnlineTransform.mixing(groups, inner)
    ref = torch.kron(orthogonal_matrix(groups), torch.eye(inner, dtype=torch.float64))
    x = torch.randn(2, 3, groups * inner, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ ref.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.dense(), ref, rtol=0, atol=0)
    # only the head axis is materialized
    expected_keys = {"factor0"}
    assert set(t.state_dict()) == expected_keys
    if inner > 1:
        assert f"I{inner}" in repr(t)


def test_online_mixing_float32() -> None:
    t = OnlineTransform.mixing(9, 64).to(torch.float32)
    assert t.factor0.dtype == torch.float32
    x = torch.randn(4, 576)
    ref = x.double() @ torch.kron(orthogonal_matrix(9), torch.eye(64, dtype=torch.float64)).T
    y = t(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_online_state_dict_round_trip() -> None:
    t = OnlineTransform.hadamard(1536)
    sd = t.state_dict()
    assert set(sd) == {"factor0", "factor1"}
    assert sd["factor0"].shape == (12, 12) and sd["factor1"].shape == (128, 128)
    fresh = OnlineTransform([torch.zeros(12, 12), torch.zeros(128, 128)])
    x = torch.randn(5, 1536, dtype=torch.float64)
    assert torch.equal(fresh.double()(x), torch.zeros_like(x))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), t(x), rtol=0, atol=0)


def test_online_pickle_and_to() -> None:
    t = OnlineTransform.mixing(9, 16)
    t2 = pickle.loads(pickle.dumps(t))
    x = torch.randn(3, 144, dtype=torch.float64)
    assert torch.equal(t2(x), t(x))
    assert t2.orders == [9, 16] and t2.n == 144
    h = pickle.loads(pickle.dumps(OnlineTransform.hadamard(28)))
    torch.testing.assert_close(h.dense(), orthogonal_matrix(28), rtol=0, atol=0)
    h32 = h.to(torch.float32)
    assert all(b.dtype == torch.float32 for b in h32.buffers())


def test_online_constructor_validation() -> None:
    with pytest.raises(ValueError):
        OnlineTransform([])
    with pytest.raises(ValueError):
        OnlineTransform([torch.ones(2, 3)])
    t = OnlineTransform([torch.eye(2), 3])
    assert t.n == 6 and t.orders == [2, 3]
    assert t.factor1 is None
