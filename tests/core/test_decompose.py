"""The input split of :mod:`quadllm.core.decompose` against its definition: ``u = Pᵀz``,
``e = z - P u``, ``[W P, W (I - P Pᵀ)] [u; e] = W z``, with P the top eigenvectors of ``E[z zᵀ]``."""

from __future__ import annotations

import pytest
import torch

from quadllm.core.decompose import Reordered, SubspaceSplit, head_basis, leading_order, split_weight, top_eigenvectors
from quadllm.core.hadamard import OnlineTransform


def _data(n=24, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    z[:, 3] *= 40  # two outlier directions, one spread over channels
    z += 25 * torch.randn(tokens, 1, generator=g, dtype=torch.float64) * torch.linspace(-1, 1, n, dtype=torch.float64)
    return z


def test_top_eigenvectors_are_orthonormal_and_span_the_largest_energy():
    z = _data()
    m = z.T @ z / z.shape[0]
    p = top_eigenvectors(m, 2)
    assert p.shape == (24, 2) and p.dtype == torch.float64
    assert torch.allclose(p.T @ p, torch.eye(2, dtype=torch.float64), atol=1e-12)
    evals = torch.linalg.eigvalsh(m).flip(0)
    assert torch.allclose(torch.diag(p.T @ m @ p), evals[:2], rtol=1e-10)  # largest first
    # no other rank-2 orthonormal basis captures more energy (a random one, for instance)
    q, _ = torch.linalg.qr(torch.randn(24, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert (q.T @ m @ q).trace() < (p.T @ m @ p).trace()


@pytest.mark.parametrize("bad, match", [(torch.ones(3, 4), "square"), (torch.eye(4), "k=4")])
def test_top_eigenvectors_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        top_eigenvectors(bad, 4)
    with pytest.raises(FloatingPointError):
        top_eigenvectors(torch.full((4, 4), float("nan")), 2)


def test_split_weight_is_the_definition_and_the_split_is_exact():
    z = _data()
    w = torch.randn(7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = top_eigenvectors(z.T @ z, 3)
    ws = split_weight(w, p)
    eye = torch.eye(24, dtype=torch.float64)
    assert torch.allclose(ws, torch.cat([w @ p, w @ (eye - p @ p.T)], 1), atol=1e-12)
    split = SubspaceSplit(p)
    out = split(z)
    assert out.shape == (200, 27) and split.out_features == 27 and split.rank == 3
    assert torch.allclose(out[:, :3], z @ p, atol=1e-10)
    assert torch.allclose(out[:, 3:], z - z @ p @ p.T, atol=1e-10)
    assert torch.allclose(out @ ws.T, z @ w.T, rtol=1e-10, atol=1e-9)
    # the rest has lost the outlier energy: its largest coordinate is far below the input's
    assert out[:, 3:].abs().max() < 0.2 * z.abs().max()


def test_a_base_transform_runs_first_and_the_basis_is_a_saved_buffer():
    z = _data(n=32)
    h = OnlineTransform.hadamard(32)
    p = top_eigenvectors(h(z).T @ h(z), 2)
    split = SubspaceSplit(p, h)
    assert torch.allclose(split(z), SubspaceSplit(p)(h(z)), atol=1e-12)
    state = split.state_dict()
    assert "basis" in state and torch.equal(state["basis"], p)
    other = SubspaceSplit(torch.zeros(32, 2, dtype=torch.float64), OnlineTransform.hadamard(32))
    other.load_state_dict(state)
    assert torch.equal(other(z), split(z))
    with pytest.raises(ValueError, match="0 < k < n"):
        SubspaceSplit(torch.zeros(4, 4))


def test_head_basis_is_orthogonal_and_its_first_coordinates_are_the_top_eigenvectors():
    v = _data(n=16)
    m = v.T @ v / v.shape[0]
    r = head_basis(m, 3)
    assert torch.allclose(r @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    p = top_eigenvectors(m, 3)
    assert torch.allclose((r[:3] @ p).abs(), torch.eye(3, dtype=torch.float64), atol=1e-9)  # the same directions
    assert torch.allclose(r[3:] @ p, torch.zeros(13, 3, dtype=torch.float64), atol=1e-9)  # the rest is orthogonal
    energy = (v @ r.T).pow(2).mean(0)
    assert energy[:3].sum() / energy.sum() > 0.9


def test_leading_order_and_reordered():
    idx = leading_order(3, 4, 1)
    assert idx.tolist() == [0, 4, 8, 1, 2, 3, 5, 6, 7, 9, 10, 11]
    x = torch.arange(12.0).reshape(1, 12)
    h = OnlineTransform.mixing(3, 4)
    t = Reordered(idx, h)
    assert torch.equal(t(x), h(x)[:, idx]) and t.in_features == 12
    assert "index" not in t.state_dict()  # rebuilt from the shapes, never read from a file
    with pytest.raises(ValueError, match="permutation"):
        Reordered(torch.tensor([0, 0, 1]))
