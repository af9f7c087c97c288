"""The compressed-tensors format as quadllm writes it, against compressed-tensors' own definitions:
packing, the per-token activation grid, the stored online-transform matrices."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
from compressed_tensors.transform import TransformConfig, TransformScheme
from compressed_tensors.transform.factory.hadamard import HadamardTransform

from quadllm.core.hadamard import OnlineTransform
from quadllm.core.quantizers import fake_quant_act
from quadllm.io import compressed_tensors as ct


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("width", [1, 7, 32, 45])
def test_packing_equals_compressed_tensors_and_round_trips(bits, width):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (6, width), dtype=torch.int8, generator=torch.Generator().manual_seed(width))
    codes[0, 0], codes[-1, -1] = lo, hi - 1  # both ends of the range
    packed = ct.pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(ct.unpack_int32(packed, bits, width), codes)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([6, width])), codes)


def test_packing_refuses_codes_it_cannot_hold():
    with pytest.raises(ValueError, match="outside"):
        ct.pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="32-bit word"):
        ct.pack_int32(torch.zeros(1, 3, dtype=torch.int8), 3)
    with pytest.raises(TypeError):
        ct.pack_int32(torch.zeros(1, 3, dtype=torch.int32), 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quadllms_grid_at_the_equivalent_clip_is_compressed_tensors_per_token_grid(bits):
    assert ct.equivalent_clip(4) == pytest.approx(14 / 15) and ct.equivalent_clip(8) == pytest.approx(254 / 255)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 33, 64, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 64, dtype=torch.float64)
    args = QuantizationArgs.model_validate(ct.quantization_args(bits, weights=False))
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Module())
    theirs = fake_quantize(x, scale, zero, args)
    ours = fake_quant_act(x.clone(), bits, ct.equivalent_clip(bits))
    # the same codes, except that each token's largest magnitude sits exactly on one of the format's
    # rounding ties (±(qmax + 0.5) steps), where the last bit of either scale decides between the two
    # neighbours: one step apart at most
    extreme = x.abs() == x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(ours[~extreme], theirs[~extreme], rtol=1e-12, atol=1e-12)
    step = scale.expand_as(x)[extreme]
    assert ((ours - theirs)[extreme].abs() <= step * (1 + 1e-9)).all()
    # quadllm's default clip is another grid
    assert not torch.allclose(fake_quant_act(x.clone(), bits, 0.9), theirs)


@pytest.mark.parametrize("n,transform", [(64, OnlineTransform.hadamard(64)), (96, OnlineTransform.hadamard(96)),
                                         (48, OnlineTransform.mixing(3, 16))])
def test_a_stored_transform_matrix_computes_quadllms_online_transform(n, transform):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    scheme = TransformScheme.model_validate(ct.transform_scheme(["mlp.down_proj"], sylvester=False))
    args = scheme.apply[0]
    weight = torch.nn.Parameter(ct.transform_weight(transform.dense()), requires_grad=False)
    theirs = HadamardTransform(weight, None, scheme, args, torch.nn.Linear)(x)
    torch.testing.assert_close(theirs, transform.to(torch.float64)(x), rtol=1e-12, atol=1e-12)


def test_the_configuration_is_valid_compressed_tensors():
    groups = {"group_0": ct.config_group(["self_attn.q_proj", "mlp.up_proj"], 4, 0, 4),
              "group_1": ct.config_group(["mlp.down_proj"], 4, 32, 8),
              "group_2": ct.config_group(["self_attn.o_proj"], 4, 0, 16)}
    schemes = {"down": ct.transform_scheme(["mlp.down_proj"], sylvester=True)}
    cfg = ct.quantization_config(groups, schemes, ignore=["lm_head"])
    tc = TransformConfig.model_validate(cfg.pop("transform_config"))
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    w0, a0 = qc.config_groups["group_0"].weights, qc.config_groups["group_0"].input_activations
    assert (w0.num_bits, w0.strategy, w0.symmetric, w0.dynamic) == (4, "channel", True, False)
    assert (a0.num_bits, a0.strategy, a0.symmetric, a0.dynamic) == (4, "token", True, True)
    assert qc.config_groups["group_1"].weights.group_size == 32
    assert qc.config_groups["group_2"].input_activations is None
    assert tc.config_groups["down"].type == "hadamard"
    import re
    target = groups["group_0"]["targets"][0].removeprefix("re:")
    assert re.match(target, "model.layers.3.self_attn.q_proj") and re.match(target, "model.layers.0.mlp.up_proj")
    assert not re.match(target, "model.layers.3.self_attn.k_proj") and not re.match(target, "lm_head")
