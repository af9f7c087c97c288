"""Hadamard matrices, orthogonal fallbacks and fast Kronecker-structured transforms.

Rotating activations and weights with an orthogonal matrix before 4-bit
quantization spreads outliers over all channels (QuaRot, SpinQuant, QUAD).
Hadamard matrices are the rotation of choice: they are orthogonal up to a
scale, all entries have the same magnitude, and when they factor as a
Kronecker product they can be applied "online" in ``O(n * sum(n_i))`` instead
of ``O(n^2)`` operations.

Constructions supported here
----------------------------
* ``n = 1`` and ``n = 2``;
* Sylvester's construction for powers of two (natural / Walsh ordering, i.e.
  ``H[i, j] = (-1) ** popcount(i & j)``);
* Paley construction I: order ``q + 1`` for a prime power ``q = 3 (mod 4)``;
* Paley construction II: order ``2 (q + 1)`` for a prime power ``q = 1 (mod 4)``;
* one Goethals-Seidel matrix of order 172 = 4 * 43, built from four
  circulants whose supports are unions of cyclotomic classes of GF(43) (this
  order, used e.g. for 11008 = 172 * 64 and 22016 = 172 * 128 channels, is not
  reachable with the Paley constructions);
* Kronecker products of one such "core" with powers of two.

Both Paley constructions use the quadratic character (Legendre symbol) of
GF(q).  Prime fields are all that most model sizes need, but prime-power
fields are also implemented (they are tiny) because some common orders need
them, e.g. ``52 = 2 (25 + 1)`` and ``28 = 27 + 1``.

Orders of other forms raise :class:`ValueError`.  Hadamard matrices can only
exist for ``n = 1, 2`` or multiples of 4; a few multiples of 4 (the smallest is
92) are not reachable with these constructions either.

For orders with no Hadamard matrix (for example 9 or 14 attention heads),
:func:`orthogonal_matrix` falls back to the orthonormal DCT-II matrix.

Conventions
-----------
All matrix builders return ``torch.float64`` tensors on the CPU.  A linear
transform with matrix ``M`` acts on row vectors along the last dimension as
``y = x @ M.T`` (so ``y_i = sum_j M[i, j] x_j``), matching
``torch.nn.functional.linear(x, M)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "sylvester_matrix",
    "hadamard_factors",
    "has_hadamard",
    "hadamard_matrix",
    "hadamard_factor_matrices",
    "orthogonal_matrix",
    "dct_matrix",
    "random_hadamard",
    "kron_transform",
    "OnlineTransform",
]

#: Largest power-of-two Kronecker factor produced by :func:`hadamard_factors`.
MAX_POW2_FACTOR = 256

_SUPPORTED_ORDERS_MSG = (
    "supported orders are m * 2**k where m is 1, 2, 172 or a Paley order "
    "(q + 1 for a prime power q = 3 mod 4, or 2 * (q + 1) for a prime power "
    "q = 1 mod 4)"
)

#: Goethals-Seidel cores: order -> (prime p, cyclotomic index e, four masks).
#: Sequence i is -1 on the union of the cyclotomic classes
#: ``{x != 0 : log_g(x) = j mod e}`` (``g`` the smallest primitive root mod p)
#: selected by bit ``j`` of mask i, and +1 elsewhere (bit ``e`` would select 0).
#: The four sequences have zero total periodic autocorrelation; found by a
#: small exhaustive search over such unions.
_GOETHALS_SEIDEL_CORES: dict[int, tuple[int, int, tuple[int, int, int, int]]] = {
    172: (43, 6, (7, 13, 19, 30)),
}


# ---------------------------------------------------------------------------
# Number theory helpers
# ---------------------------------------------------------------------------


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q == p ** k`` for a prime ``p``, else ``None``."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
        p += 1
    return q, 1  # q itself is prime


def _core_kind(m: int) -> tuple[str, int] | None:
    """How a non-power-of-two core of order ``m`` is built, or ``None``.

    Returns ``("paley1", q)``, ``("paley2", q)`` or ``("gs", p)``.
    """
    paley = _paley_kind(m)
    if paley is not None:
        return ("paley1" if paley[0] == 1 else "paley2", paley[1])
    if m in _GOETHALS_SEIDEL_CORES:
        return "gs", _GOETHALS_SEIDEL_CORES[m][0]
    return None


def _paley_kind(m: int) -> tuple[int, int] | None:
    """Return ``(construction, q)`` if a Paley construction gives order ``m``.

    ``construction`` is 1 (order ``q + 1``, ``q = 3 mod 4``) or 2 (order
    ``2 (q + 1)``, ``q = 1 mod 4``).  Construction I is preferred when both
    apply.
    """
    if m < 4 or m % 4 != 0:
        return None
    q = m - 1
    if q % 4 == 3 and _prime_power(q) is not None:
        return 1, q
    q = m // 2 - 1
    if q % 4 == 1 and _prime_power(q) is not None:
        return 2, q
    return None


# ---------------------------------------------------------------------------
# Finite fields GF(p^k) and the quadratic character
# ---------------------------------------------------------------------------


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` modulo monic ``f`` over GF(p).

    Polynomials are coefficient lists, lowest degree first.
    """
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return a[:d] + [0] * max(0, d - len(a))


def _monic_polys(degree: int, p: int) -> list[list[int]]:
    """All monic polynomials of the given degree over GF(p)."""
    polys = []
    for code in range(p**degree):
        coeffs = []
        for _ in range(degree):
            code, c = divmod(code, p)
            coeffs.append(c)
        polys.append(coeffs + [1])
    return polys


def _irreducible_poly(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree ``k`` over GF(p)."""
    divisors = [g for d in range(1, k // 2 + 1) for g in _monic_polys(d, p)]
    for f in _monic_polys(k, p):
        if f[0] == 0:  # divisible by x
            continue
        if all(any(_poly_rem(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable


def _quadratic_character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic character of GF(q) and the field's subtraction table.

    Field elements are numbered ``0..q-1``: for ``q = p**k`` element ``a`` is
    the polynomial whose coefficients are the base-``p`` digits of ``a``
    (so element 0 is the zero of the field).

    Returns:
        ``(chi, diff)`` where ``chi[a]`` is 0 for ``a = 0``, +1 for a nonzero
        square and -1 otherwise, and ``diff[i, j]`` is the number of the
        element ``a_i - a_j``.
    """
    pk = _prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    chi = -np.ones(q, dtype=np.int64)
    idx = np.arange(q, dtype=np.int64)
    if k == 1:
        chi[(idx[1:] * idx[1:]) % q] = 1
        chi[0] = 0
        diff = (idx[:, None] - idx[None, :]) % q
        return chi, diff

    f = _irreducible_poly(p, k)
    digits = np.stack([(idx // p**t) % p for t in range(k)], axis=1)  # (q, k)
    weights = p ** np.arange(k, dtype=np.int64)
    for a in range(1, q):
        coeffs = [int(c) for c in digits[a]]
        square = [0] * (2 * k - 1)
        for i, ci in enumerate(coeffs):
            if ci:
                for j, cj in enumerate(coeffs):
                    square[i + j] += ci * cj
        rem = _poly_rem(square, f, p)
        chi[int(np.dot(rem, weights))] = 1
    chi[0] = 0
    diff = np.zeros((q, q), dtype=np.int64)
    for t in range(k):
        diff += ((digits[:, None, t] - digits[None, :, t]) % p) * weights[t]
    return chi, diff


# ---------------------------------------------------------------------------
# Elementary Hadamard matrices
# ---------------------------------------------------------------------------


def sylvester_matrix(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n = 2**k``: ``H[i,j] = (-1)^popcount(i & j)`` (float64, ±1)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[i, j] = chi(a_i - a_j)`` of GF(q)."""
    chi, diff = _quadratic_character_table(q)
    return torch.from_numpy(chi[diff].astype(np.float64))


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I, order ``q + 1`` (``q = 3 mod 4``).

    ``H = I + S`` with the skew conference matrix ``S = [[0, 1^T], [-1, Q]]``.
    """
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Paley construction II, order ``2 (q + 1)`` (``q = 1 mod 4``).

    With the symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``,
    ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``.
    """
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _primitive_root(p: int) -> int:
    """Smallest primitive root modulo the prime ``p``."""
    if p == 2:
        return 1
    prime_divisors = [r for r in range(2, p) if (p - 1) % r == 0 and _prime_power(r) == (r, 1)]
    for g in range(2, p):
        if all(pow(g, (p - 1) // r, p) != 1 for r in prime_divisors):
            return g
    raise ValueError(f"{p} is not prime")


def _cyclotomic_sequence(p: int, e: int, mask: int) -> torch.Tensor:
    """±1 sequence of length ``p``: -1 on the cyclotomic classes selected by ``mask``."""
    g = _primitive_root(p)
    cls = torch.full((p,), e, dtype=torch.int64)  # class e stands for the element 0
    x = 1
    for k in range(p - 1):
        cls[x] = k % e
        x = x * g % p
    return 1.0 - 2.0 * ((mask >> cls) & 1).to(torch.float64)


def _goethals_seidel(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """Goethals-Seidel array of order ``4 p`` from four ±1 sequences of length ``p``.

    The sequences must have zero total periodic autocorrelation, so that their
    circulants satisfy ``A A^T + B B^T + C C^T + D D^T = 4 p I``.
    """
    p = a.shape[0]
    idx = (torch.arange(p)[None, :] - torch.arange(p)[:, None]) % p
    A, B, C, D = (s[idx] for s in (a, b, c, d))  # circulants: X[i, j] = x[j - i]
    R = torch.eye(p, dtype=torch.float64).flip(1)
    return torch.cat(
        [
            torch.cat([A, B @ R, C @ R, D @ R], dim=1),
            torch.cat([-B @ R, A, D.T @ R, -C.T @ R], dim=1),
            torch.cat([-C @ R, -D.T @ R, A, B.T @ R], dim=1),
            torch.cat([-D @ R, C.T @ R, -B.T @ R, A], dim=1),
        ],
        dim=0,
    )


@functools.lru_cache(maxsize=64)
def _factor_matrix_cached(m: int) -> torch.Tensor:
    if _is_power_of_two(m):
        return sylvester_matrix(m)
    kind = _core_kind(m)
    if kind is None:  # pragma: no cover - callers only pass factors from hadamard_factors
        raise ValueError(f"{m} is not a power of two or a supported core order")
    construction, q = kind
    if construction == "paley1":
        return _paley1(q)
    if construction == "paley2":
        return _paley2(q)
    p, e, masks = _GOETHALS_SEIDEL_CORES[m]
    return _goethals_seidel(*(_cyclotomic_sequence(p, e, mk) for mk in masks))


# ---------------------------------------------------------------------------
# Public API: factorizations and dense matrices
# ---------------------------------------------------------------------------


def _check_order(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"order must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    return n


def _split_pow2(e: int) -> list[int]:
    """Split ``2**e`` into as few, as balanced as possible, factors <= 256 (descending)."""
    if e == 0:
        return []
    max_e = MAX_POW2_FACTOR.bit_length() - 1
    count = -(-e // max_e)
    base, extra = divmod(e, count)
    return [2 ** (base + 1)] * extra + [2**base] * (count - extra)


@functools.lru_cache(maxsize=None)
def _find_factors(n: int) -> tuple[int, ...] | None:
    e = (n & -n).bit_length() - 1
    odd = n >> e
    if odd == 1:
        return tuple(_split_pow2(e)) or (1,)
    for a in range(2, e + 1):  # smallest core first
        core = odd << a
        if _core_kind(core) is not None:
            return (core, *_split_pow2(e - a))
    return None


def hadamard_factors(n: int) -> list[int]:
    """Factor ``n`` into Hadamard orders whose Kronecker product has order ``n``.

    The result is ``[core, p_1, p_2, ...]`` where ``core`` is the smallest
    non-power-of-two core order ``m`` (a Paley order or 172) with
    ``n = m * 2**k`` and the ``p_i`` are powers of two, each at most
    :data:`MAX_POW2_FACTOR` (256), split as evenly as possible and in
    descending order.  For a power of two ``n`` there
    is no core and the list holds only the power-of-two factors (``[1]`` for
    ``n = 1``).

    Examples: ``16384 -> [128, 128]``, ``576 -> [36, 16]``,
    ``1536 -> [12, 128]``, ``14336 -> [28, 32, 16]``, ``18944 -> [148, 128]``.

    The Kronecker product of :func:`hadamard_factor_matrices` ``(n)`` (the
    ±1 matrices of these orders, in this order) is exactly
    ``hadamard_matrix(n)``.

    Raises:
        ValueError: if no Hadamard matrix of order ``n`` can be built here.
    """
    n = _check_order(n)
    factors = _find_factors(n)
    if factors is None:
        if n > 2 and n % 4 != 0:
            reason = "Hadamard matrices exist only for n = 1, 2 or multiples of 4"
        else:
            reason = "this order is not covered by the implemented constructions"
        raise ValueError(
            f"no Hadamard matrix of order {n}: {reason}; {_SUPPORTED_ORDERS_MSG}"
        )
    return list(factors)


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build a Hadamard matrix of order ``n``."""
    try:
        n = _check_order(n)
    except (TypeError, ValueError):
        return False
    return _find_factors(n) is not None


def hadamard_factor_matrices(n: int) -> list[torch.Tensor]:
    """The (non-normalized, ±1) Hadamard matrices of the orders in :func:`hadamard_factors`.

    ``torch.kron`` of the returned list equals :func:`hadamard_matrix` ``(n)``.
    Each call returns fresh tensors (float64).
    """
    return [_factor_matrix_cached(m).clone() for m in hadamard_factors(n)]


@functools.lru_cache(maxsize=8)
def _hadamard_matrix_cached(n: int) -> torch.Tensor:
    mats = [_factor_matrix_cached(m) for m in hadamard_factors(n)]
    h = mats[0]
    for m in mats[1:]:
        h = torch.kron(h, m)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n``: entries ±1 and ``H @ H.T == n * I``.

    The matrix is the Kronecker product of the factors given by
    :func:`hadamard_factors` (a Sylvester matrix for powers of two, so
    ``H[i, j] = (-1) ** popcount(i & j)`` in that case).  It is not
    normalized; divide by ``sqrt(n)`` for an orthogonal matrix (see
    :func:`orthogonal_matrix`).  Results are cached; a fresh float64 copy is
    returned on every call.

    Raises:
        ValueError: if no Hadamard matrix of order ``n`` can be built here
            (always for ``n`` not in ``{1, 2}`` and not a multiple of 4).
    """
    n = _check_order(n)
    return _hadamard_matrix_cached(n).clone()


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of order ``n`` (float64).

    Rows are the basis vectors:
    ``D[k, i] = s_k * cos(pi * (2 i + 1) * k / (2 n))`` with
    ``s_0 = sqrt(1 / n)`` and ``s_k = sqrt(2 / n)`` for ``k > 0``, so
    ``D @ D.T == I`` up to rounding.
    """
    n = _check_order(n)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
    d[0] *= math.sqrt(0.5)
    return d


@functools.lru_cache(maxsize=8)
def _orthogonal_matrix_cached(n: int) -> torch.Tensor:
    if has_hadamard(n):
        return _hadamard_matrix_cached(n) / math.sqrt(n)
    return dct_matrix(n)


def orthogonal_matrix(n: int) -> torch.Tensor:
    """An orthogonal matrix ``Q`` of order ``n`` (``Q @ Q.T == I``), float64.

    This is the normalized Hadamard matrix ``hadamard_matrix(n) / sqrt(n)``
    when :func:`has_hadamard` ``(n)``, and otherwise the orthonormal DCT-II
    matrix (:func:`dct_matrix`).  The DCT fallback keeps rotations possible
    for orders without a Hadamard matrix, e.g. to mix 9 or 14 attention heads.
    A fresh copy is returned on every call.
    """
    n = _check_order(n)
    return _orthogonal_matrix_cached(n).clone()


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """A randomized orthogonal Hadamard matrix (as in QuaRot), float64.

    Returns ``R = Q @ diag(s)`` where ``Q = orthogonal_matrix(n)`` (the
    normalized Hadamard ``H / sqrt(n)``, or the DCT-II fallback when no
    Hadamard matrix of order ``n`` exists) and ``s`` is a vector of random
    ±1 signs drawn from ``torch.Generator().manual_seed(seed)``; i.e. column
    ``j`` of ``Q`` is multiplied by ``s[j]``.  ``R @ R.T == I``.  Under the
    ``y = x @ R.T`` convention the signs are applied to ``x`` first, then the
    Hadamard transform.  The same ``(n, seed)`` always gives the same matrix.
    """
    n = _check_order(n)
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2.0 - 1.0
    return orthogonal_matrix(n) * signs[None, :]


# ---------------------------------------------------------------------------
# Kronecker-structured transforms
# ---------------------------------------------------------------------------


def _factor_order(m: torch.Tensor | int) -> int:
    if isinstance(m, torch.Tensor):
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(
                f"Kronecker factors must be square matrices, got shape {tuple(m.shape)}"
            )
        return int(m.shape[0])
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise TypeError(f"Kronecker factors must be square tensors or positive ints, got {m!r}")
    return int(m)


def kron_transform(x: torch.Tensor, mats: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Compute ``x @ kron(M_1, ..., M_k).T`` along the last dimension of ``x``.

    The Kronecker product is never formed: the last dimension ``n`` of ``x``
    is viewed as ``(n_1, ..., n_k)`` (row-major, matching ``torch.kron``) and
    each factor ``M_i`` (``n_i x n_i``) is contracted with its own axis.  This
    costs ``O(n * sum(n_i))`` per row instead of ``O(n^2)``.

    Args:
        x: floating-point tensor of shape ``(..., n)`` with
            ``n = n_1 * ... * n_k``.
        mats: the factors ``M_1, ..., M_k``; they are cast to ``x.dtype`` and
            ``x.device``.  An ``int`` entry ``m`` stands for the identity of
            order ``m`` and costs nothing.

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    if not x.is_floating_point():
        raise TypeError(f"kron_transform needs a floating-point tensor, got {x.dtype}")
    if len(mats) == 0:
        raise ValueError("kron_transform needs at least one factor")
    orders = [_factor_order(m) for m in mats]
    n = math.prod(orders)
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(
            f"last dimension of x must be {n} (= {' * '.join(map(str, orders))}), "
            f"got shape {tuple(x.shape)}"
        )
    shape = x.shape
    y = x.reshape(-1, n)
    post = n
    applied = False
    for m, k in zip(mats, orders):
        post //= k
        if not isinstance(m, torch.Tensor):
            continue  # identity factor
        mat = m.to(dtype=x.dtype, device=x.device)
        if post == 1:
            y = y.reshape(-1, k) @ mat.T
        else:
            # (rows * pre, k, post): contract the middle axis with mat.
            y = torch.matmul(mat, y.reshape(-1, k, post))
        applied = True
    if not applied:
        return x.clone()
    return y.reshape(shape)


class OnlineTransform(torch.nn.Module):
    """A Kronecker-structured linear map ``y = x @ kron(M_1, ..., M_k).T``.

    The factors are registered as buffers ``factor0``, ``factor1``, ... so they
    follow ``.to()`` / ``.cuda()`` and appear in ``state_dict``.  An identity
    factor is given as an ``int`` order; its buffer slot is ``None`` (not
    stored, not computed).  ``forward`` uses :func:`kron_transform`, so the
    dense ``n x n`` matrix is never formed.

    Attributes:
        n: total order ``prod(orders)``.
        orders: order of each factor.
    """

    def __init__(self, factors: Sequence[torch.Tensor | int]) -> None:
        super().__init__()
        if len(factors) == 0:
            raise ValueError("OnlineTransform needs at least one factor")
        self.orders: list[int] = [_factor_order(f) for f in factors]
        self.identity: list[bool] = [not isinstance(f, torch.Tensor) for f in factors]
        self.n: int = math.prod(self.orders)
        for i, f in enumerate(factors):
            buf = None
            if isinstance(f, torch.Tensor):
                buf = f.detach().clone(memory_format=torch.contiguous_format)
            self.register_buffer(f"factor{i}", buf)

    @classmethod
    def hadamard(cls, n: int) -> OnlineTransform:
        """The normalized Hadamard transform of order ``n``.

        Factors are ``hadamard_matrix(m) / sqrt(m)`` for ``m`` in
        :func:`hadamard_factors` ``(n)``, so ``dense()`` equals
        ``hadamard_matrix(n) / sqrt(n)`` and is orthogonal.
        """
        return cls([_factor_matrix_cached(m) / math.sqrt(m) for m in hadamard_factors(n)])

    @classmethod
    def mixing(cls, groups: int, inner: int) -> OnlineTransform:
        """``kron(orthogonal_matrix(groups), I_inner)``: mixes whole groups.

        Used to rotate across attention heads (``groups`` = number of heads,
        ``inner`` = head dimension): only the head axis is contracted, the
        identity is implicit.  Falls back to the DCT when ``groups`` has no
        Hadamard matrix (see :func:`orthogonal_matrix`).
        """
        groups = _check_order(groups)
        inner = _check_order(inner)
        factors: list[torch.Tensor | int] = [orthogonal_matrix(groups)]
        if inner > 1:
            factors.append(inner)
        return cls(factors)

    def factors(self) -> list[torch.Tensor | int]:
        """The current factors (buffers, or ``int`` orders for identity factors)."""
        out: list[torch.Tensor | int] = []
        for i, (k, ident) in enumerate(zip(self.orders, self.identity)):
            out.append(k if ident else getattr(self, f"factor{i}"))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the transform along the last dimension of ``x``."""
        return kron_transform(x, self.factors())

    def dense(self) -> torch.Tensor:
        """The full ``n x n`` matrix ``kron(M_1, ..., M_k)`` (for testing / fusing)."""
        mats = [
            torch.eye(f, dtype=self._dtype(), device=self._device()) if isinstance(f, int) else f
            for f in self.factors()
        ]
        out = mats[0]
        for m in mats[1:]:
            out = torch.kron(out, m.to(out.dtype))
        return out

    def transposed(self) -> OnlineTransform:
        """The transform with every factor transposed (the inverse if orthogonal)."""
        return OnlineTransform([f if isinstance(f, int) else f.T for f in self.factors()])

    def _dtype(self) -> torch.dtype:
        for f in self.factors():
            if isinstance(f, torch.Tensor):
                return f.dtype
        return torch.float64

    def _device(self) -> torch.device:
        for f in self.factors():
            if isinstance(f, torch.Tensor):
                return f.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        parts = [f"I{k}" if ident else str(k) for k, ident in zip(self.orders, self.identity)]
        return f"n={self.n}, factors=[{', '.join(parts)}]"
