"""``quad_attention``'s one-token path (:func:`one_token_gqa`) against its reference: every query
head attends its KV head's keys and values repeated to it (transformers' ``repeat_kv`` + SDPA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from quadllm.nn import modules
from quadllm.nn.modules import one_token_gqa, quad_attention


def _reference(q, k, v, mask, groups, scale):
    out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("groups,masked", [(3, False), (3, True), (7, True), (1, True)])
def test_one_token_gqa_is_attention_over_repeated_heads(groups, masked):
    g = torch.Generator().manual_seed(groups)
    b, kv_heads, length, d = 2, 2, 11, 16
    q = torch.randn(b, kv_heads * groups, 1, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None
    if masked:  # sequence 1 padded on the left, and the cache's unused tail of both
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :3] = False
        mask[..., -2:] = False
    got = one_token_gqa(q, k, v, mask, groups, 0.3)
    assert got.shape == (b, 1, kv_heads * groups, d) and got.is_contiguous()
    torch.testing.assert_close(got, _reference(q, k, v, mask, groups, 0.3), rtol=1e-12, atol=1e-12)


def test_quad_attention_takes_the_one_token_path_only_where_it_applies(monkeypatch):
    """One token with grouped heads: the packed path, equal to transformers' SDPA function; several
    tokens or a per-head mask: transformers' function itself."""
    calls = []
    monkeypatch.setattr(modules, "one_token_gqa", lambda *a: calls.append(1) or one_token_gqa(*a))
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for tokens, mask in ((1, torch.ones(1, 1, 1, 9, dtype=torch.bool)), (1, None), (4, None),
                         (1, torch.rand(1, 6, 1, 9, generator=g) > 0.3)):
        q = torch.randn(1, 6, tokens, 8, generator=g, dtype=torch.float64)
        got, _ = quad_attention(module, q, k, v, mask, scaling=0.35)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.35)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2  # the two one-token cases with a shared (or no) mask
