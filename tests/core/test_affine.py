"""The learned transform's math (:mod:`quadllm.core.affine`) against its dense definition
``T = kron(L, R) diag(s)``, and the straight-through weight quantizer it trains with."""

from __future__ import annotations

import pytest
import torch

from quadllm.core.affine import AffineTail, affine_macs, apply_affine, fuse_affine, kron_shape


def _factors(a: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    left = torch.eye(a, dtype=torch.float64) + 0.3 * torch.randn(a, a, generator=g, dtype=torch.float64)
    right = torch.eye(b, dtype=torch.float64) + 0.3 * torch.randn(b, b, generator=g, dtype=torch.float64)
    scale = torch.rand(a * b, generator=g, dtype=torch.float64) + 0.5
    return left, right, scale


@pytest.mark.parametrize("n, shape", [(576, (24, 24)), (1536, (32, 48)), (504, (21, 24)), (7, (1, 7)), (1, (1, 1))])
def test_kron_shape_takes_the_largest_divisor_up_to_the_square_root(n, shape):
    assert kron_shape(n) == shape
    a, b = shape
    assert affine_macs(n) == n * (a + b + 1)


def test_kron_shape_refuses_an_empty_input():
    with pytest.raises(ValueError, match="n must be"):
        kron_shape(0)


def test_apply_affine_is_x_times_the_dense_transform():
    left, right, scale = _factors(3, 4)
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    dense = torch.kron(left, right) @ torch.diag(scale)
    torch.testing.assert_close(apply_affine(x, left, right, scale), x @ dense.T, rtol=1e-12, atol=1e-12)


def test_the_fused_weight_reading_the_transformed_input_computes_the_original_product():
    left, right, scale = _factors(4, 6, seed=1)
    w = torch.randn(7, 24, dtype=torch.float64)
    x = torch.randn(9, 24, dtype=torch.float64)
    torch.testing.assert_close(apply_affine(x, left, right, scale) @ fuse_affine(w, left, right, scale).T, x @ w.T,
                               rtol=1e-10, atol=1e-10)
    dense = torch.kron(left, right) @ torch.diag(scale)
    torch.testing.assert_close(fuse_affine(w, left, right, scale), w @ torch.linalg.inv(dense), rtol=1e-10, atol=1e-10)


def test_the_module_keeps_the_first_coordinates_and_transforms_the_rest_after_its_base():
    left, right, scale = _factors(2, 5, seed=2)
    base = torch.nn.Linear(13, 13, bias=False).double()
    t = AffineTail(3, left, right, scale, base=base)
    x = torch.randn(4, 13, dtype=torch.float64)
    with torch.no_grad():
        z = base(x)
        y = t(x)
    torch.testing.assert_close(y[:, :3], z[:, :3])
    torch.testing.assert_close(y[:, 3:], z[:, 3:] @ t.matrix().T)
    assert t.n == 10 and set(dict(t.named_buffers())) >= {"left", "right", "scale"}
    ident = AffineTail.identity(3, 10, torch.float64)
    torch.testing.assert_close(ident(x[:, :13]), x[:, :13])
    torch.testing.assert_close(ident.matrix(), torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be"):
        AffineTail(0, left, right, scale[:4])
