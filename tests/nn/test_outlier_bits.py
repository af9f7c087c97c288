"""``--o-rank-bits 8``: o_proj's principal coordinates (``--o-rank``) at INT8 instead of full
precision, ResQ's middle precision: inputs per token, weights per output channel."""

from __future__ import annotations

import pytest
import torch
from conftest import config_recorded_before, quantize_tiny, quantized_in_memory_and_streaming, random_ids

from quadllm import QuantConfig
from quadllm.config import ActSpec, ConfigError
from quadllm.core.quantizers import fake_quant_act, fake_quant_weight
from quadllm.nn.modules import QuadLinear


def test_a_quantized_linear_computes_its_int8_outlier_columns_as_defined():
    g = torch.Generator().manual_seed(0)
    r, n_in, n_out = 4, 20, 6
    lin = QuadLinear(n_in, n_out, rank=r, act=ActSpec(bits=4, clip_ratio=0.9, outlier_bits=8))
    codes = torch.randint(-8, 8, (n_out, n_in - r), generator=g, dtype=torch.int8)
    scales = torch.rand(n_out, 1, generator=g) + 0.1
    w_out = torch.randn(n_out, r, generator=g)
    lin.set_quantized(codes, scales, w_out, 4, 0)
    x = 3 * torch.randn(5, n_in, generator=g)
    ref = (fake_quant_act(x[:, r:], 4, 0.9) @ (codes.float() * scales).t()
           + fake_quant_act(x[:, :r], 8) @ fake_quant_weight(w_out, 8).t())
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
        lin.act_enabled = False  # calibration: inputs as they are, the weights still on their grid
        torch.testing.assert_close(lin(x), x[:, r:] @ (codes.float() * scales).t() + x[:, :r] @ fake_quant_weight(w_out, 8).t(),
                                   rtol=1e-5, atol=1e-5)
    full = QuadLinear(n_in, n_out, rank=r, act=ActSpec(bits=4, clip_ratio=0.9))
    full.set_quantized(codes, scales, w_out, 4, 0)
    with torch.no_grad():
        assert not torch.allclose(full(x), ref)  # the full-precision columns compute otherwise


def test_the_option_is_validated_and_recorded_and_only_o_proj_gets_it():
    cfg = QuantConfig(method="quad", o_rank=8, o_rank_bits=8)
    assert cfg.act_spec("o_proj").outlier_bits == 8
    assert cfg.act_spec("reader").outlier_bits == 16 and cfg.act_spec("down_proj").outlier_bits == 16
    assert QuantConfig(method="quad", mode="w4a16", o_rank=8, o_rank_bits=8).act_spec("o_proj").outlier_bits == 16
    assert "o_proj input rank 8 per head at INT8" in cfg.describe()
    assert "at INT8" not in QuantConfig(method="quad", o_rank=8).describe()
    with pytest.raises(ConfigError, match="o_rank_bits"):
        QuantConfig(method="quad", o_rank=8, o_rank_bits=4)
    with pytest.raises(ConfigError, match="needs o_rank"):
        QuantConfig(method="quad", o_rank=0, o_rank_bits=8)
    assert config_recorded_before("o_rank_bits").o_rank_bits == 16


def test_the_checkpoint_stores_the_int8_grid_and_loads_the_same_in_memory_and_streaming(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", o_rank=2, o_rank_bits=8, calib_samples=4,
                      calib_seqlen=16, calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["o_rank_bits"] == 8
    for m in (model, a, b):
        o = m.model.layers[0].self_attn.o_proj
        assert o.act.outlier_bits == 8 and o.rank > 0
        torch.testing.assert_close(fake_quant_weight(o.w_outlier.float(), 8), o.w_outlier.float(), rtol=0, atol=1e-3)
        assert m.model.layers[0].mlp.down_proj.act.outlier_bits == 16
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, model(ids).logits)
        torch.testing.assert_close(b(ids).logits, model(ids).logits)
    int8 = quantize_tiny("llama", method="quad", rank=8, weights="rtn", o_rank=2, o_rank_bits=8)
    full = quantize_tiny("llama", method="quad", rank=8, weights="rtn", o_rank=2)
    with torch.no_grad():
        assert not torch.equal(int8(ids).logits, full(ids).logits)
