"""Tensor parallelism simulated on one CPU: a row-parallel quadllm linear cut into shards adds up to
the layer when its online transform is aligned to the shards and the ranks all-reduce the per-token
maximum; with a transform that mixes shards, the cut refuses and the all-gather design still holds."""

from __future__ import annotations

import pytest
import torch

from quadllm.config import ActSpec
from quadllm.core.hadamard import OnlineTransform
from quadllm.core.quantizers import fake_quant_act
from quadllm.nn.modules import QuadLinear
from quadllm.nn.tensor_parallel import (
    aligned_transform,
    gathered_outputs,
    local_transform,
    row_parallel_partials,
    shard_bounds,
)


def _layer(n_in: int, n_out: int, rank: int, transform, *, bias: bool = True, group: int = 0,
           outlier_bits: int = 16, seed: int = 0) -> QuadLinear:
    g = torch.Generator().manual_seed(seed)
    lin = QuadLinear(n_in, n_out, rank=rank, bias=bias, act=ActSpec(bits=4, clip_ratio=0.9, outlier_bits=outlier_bits),
                     transform=transform, dtype=torch.float64)
    if bias:
        lin.bias.data = torch.randn(n_out, generator=g, dtype=torch.float64)
    groups = (n_in - rank) // group if group else 1
    lin.set_quantized(torch.randint(-8, 8, (n_out, n_in - rank), generator=g, dtype=torch.int8),
                      torch.rand(n_out, groups, generator=g, dtype=torch.float64) + 0.1,
                      torch.randn(n_out, rank, generator=g, dtype=torch.float64), 4, group)
    return lin


def _x(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    x[..., 7] *= 40  # an outlier channel: the per-token maximum sits on one rank only
    return x


@pytest.mark.parametrize("shards", [2, 4])
def test_down_proj_with_an_aligned_hadamard_adds_up_over_shards(shards):
    n = 64
    lin = _layer(n, 24, rank=0, transform=aligned_transform(OnlineTransform.hadamard(n // shards), shards))
    x = _x(n)
    with torch.no_grad():
        ref = lin(x)
    parts = row_parallel_partials(lin, x, shards)
    assert len(parts) == shards
    torch.testing.assert_close(sum(parts), ref, rtol=1e-10, atol=1e-10)


def test_o_proj_rotation_within_each_ranks_heads_and_outlier_columns_on_rank_0():
    heads, head_dim, shards, r = 8, 8, 2, 4
    local = OnlineTransform.mixing(heads // shards, head_dim)
    lin = _layer(heads * head_dim, 16, rank=r, transform=aligned_transform(local, shards), outlier_bits=8)
    x = _x(heads * head_dim)
    with torch.no_grad():
        ref = lin(x)
    torch.testing.assert_close(sum(row_parallel_partials(lin, x, shards)), ref, rtol=1e-10, atol=1e-10)


def test_without_the_all_reduce_of_the_maximum_the_shards_would_round_differently():
    n, shards = 64, 2
    lin = _layer(n, 24, rank=0, transform=None, bias=False)
    x = _x(n)
    with torch.no_grad():
        ref = lin(x)
        own_maximum = sum(fake_quant_act(x[..., lo:hi], 4, 0.9) @ lin.dequantized_weight()[:, lo:hi].T
                          for lo, hi in shard_bounds(n, shards))
    assert not torch.allclose(own_maximum, ref, atol=1e-3)
    torch.testing.assert_close(sum(row_parallel_partials(lin, x, shards)), ref, rtol=1e-10, atol=1e-10)


def test_a_transform_that_mixes_shards_refuses_the_cut_and_the_all_gather_design_is_exact():
    n, shards = 64, 2
    lin = _layer(n, 24, rank=4, transform=OnlineTransform.hadamard(n))
    with pytest.raises(ValueError, match="mixes coordinates across 2 shards"):
        row_parallel_partials(lin, _x(n), shards)
    x = _x(n)
    with torch.no_grad():
        ref = lin(x)
    outs = gathered_outputs(lin, x, shards)
    assert [o.shape[-1] for o in outs] == [12, 12]
    torch.testing.assert_close(torch.cat(outs, -1), ref, rtol=1e-12, atol=1e-12)


def test_local_transform_of_kronecker_factors():
    h = OnlineTransform.hadamard(16)
    assert local_transform(aligned_transform(h, 4), 4).n == 16
    assert local_transform(OnlineTransform([8, 2]), 4) is None  # identity: nothing to apply
    mixed = OnlineTransform([2, torch.eye(4, dtype=torch.float64)])
    assert local_transform(mixed, 2).n == 4
    with pytest.raises(ValueError, match="mixes"):
        local_transform(mixed, 4)
    assert local_transform(None, 4) is None


def test_the_cut_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="equal shards"):
        shard_bounds(10, 4)
    with pytest.raises(ValueError, match="first shard"):
        row_parallel_partials(_layer(16, 4, rank=8, transform=None), _x(16), 2)
    with pytest.raises(ValueError, match="straddle"):
        row_parallel_partials(_layer(40, 4, rank=0, transform=None, group=8), _x(40), 4)
