"""QuantConfig: defaults, roles, validation, what it says a run needs, and its round trip."""

from __future__ import annotations

import pytest

from quadllm.config import DEFAULT_RANK, QUAD_RECIPE, RECIPE_OFF, ConfigError, QuantConfig


def test_method_defaults_and_roles():
    assert QuantConfig().rank == 64
    assert QuantConfig(method="quarot").rank == 0
    assert QuantConfig(method="rtn").rank == 0 and not QuantConfig(method="rtn").rotate
    c = QuantConfig(mode="w4a4a8")
    assert c.act_spec("reader").bits == 4 and c.act_spec("o_proj").bits == 8 and c.act_spec("down_proj").bits == 8
    assert QuantConfig(mode="w4a8").act_spec("reader").bits == 8
    assert not QuantConfig(mode="w4a16").act_spec("down_proj").enabled
    assert QuantConfig(a_clip=0.8).act_spec("reader").clip_ratio == 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="gptq"), "method"),
    (dict(mode="w3a3"), "mode"),
    (dict(kv_bits=2), "kv_bits"),
    (dict(rank=-1), "rank"),
    (dict(method="quarot", rank=16), "rank 0"),
    (dict(a_clip=1.5), "a_clip"),
    (dict(group_size=-4), "group_size"),
    (dict(calib_samples=0), "calib_samples"),
    (dict(weights="gptaq", gptaq_alpha=1.5), "gptaq_alpha"),
])
def test_bad_configurations(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_config_round_trip():
    c = QuantConfig(method="quad", rank=16, mode="w4a4a8", group_size=64, kv_bits=4, seed=3)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({**c.to_dict(), "bogus": 1})
    assert "QUAD rank 16" in c.describe() and "seed 3" in c.describe()


def test_a_config_recorded_before_a_key_existed_reads_as_it_was_made():
    old = {k: v for k, v in QuantConfig(weights="gptaq").to_dict().items() if k != "gptaq_alpha"}
    assert QuantConfig.from_dict(old).gptaq_alpha == 1.0  # GPTAQ applied the whole correction then
    assert QuantConfig().gptaq_alpha == 0.25


def test_quad_at_w4a4_defaults_to_the_recipe_and_the_baselines_do_not():
    assert {k: getattr(QuantConfig(), k) for k in QUAD_RECIPE} == QUAD_RECIPE
    for off in (dict(method="quarot"), dict(method="rtn"), dict(mode="w4a16"), dict(mode="w4a8")):
        assert {k: getattr(QuantConfig(**off), k) for k in RECIPE_OFF} == RECIPE_OFF, off
    assert QuantConfig(kv_bits=4).o_rank == 0 and QuantConfig(kv_bits=4).a_clip_search  # o_rank needs KV16
    assert QuantConfig(group_size=128).o_rank == 0  # its FP columns would leave groups a count they need not divide
    explicit = QuantConfig(a_clip_search=False, o_rank=4, down_smooth=0.0)
    assert (explicit.a_clip_search, explicit.o_rank, explicit.down_smooth) == (False, 4, 0.0)
    assert QuantConfig(method="quarot", o_rank=4).o_rank == 4
    with pytest.raises(ConfigError, match="use kv_bits 16 with o_rank"):
        QuantConfig(kv_bits=4, o_rank=8)
    # a saved configuration holds the resolved values, so it reads back as it was made
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()
    old = {k: v for k, v in QuantConfig().to_dict().items() if k not in QUAD_RECIPE}
    assert {k: getattr(QuantConfig.from_dict(old), k) for k in RECIPE_OFF} == RECIPE_OFF


def test_what_a_config_needs():
    assert QuantConfig().rank == DEFAULT_RANK and QuantConfig().needs_calibration
    assert not QuantConfig(method="quarot", weights="rtn").needs_calibration
    assert QuantConfig(method="quarot", weights="gptq").needs_calibration
    assert not QuantConfig(method="rtn", weights="rtn").residual_transform
    assert QuantConfig(method="quarot", weights="rtn").residual_transform
    QuantConfig(rank=48).check_model_sizes(48)
    with pytest.raises(ConfigError, match="larger than the hidden size"):
        QuantConfig(rank=49).check_model_sizes(48)
    QuantConfig(rank=8, down_rank=8).check_model_sizes(48, 9)
    with pytest.raises(ConfigError, match="smaller than the intermediate size"):
        QuantConfig(rank=8, down_rank=9).check_model_sizes(48, 9)
    with pytest.raises(ConfigError, match="down_rank and o_rank must be >= 0"):
        QuantConfig(down_rank=-1)
    assert QuantConfig(method="quarot", weights="rtn", down_rank=4).needs_layer_inputs
    assert "down_proj input rank 4" in QuantConfig(down_rank=4).describe()
