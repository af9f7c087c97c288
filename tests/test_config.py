"""QuantConfig: defaults, roles, validation, what it says a run needs, and its round trip."""

from __future__ import annotations

import pytest

from quadllm.config import (
    DEFAULT_RANK,
    QUAD_RECIPE,
    RECIPE_OFF,
    ConfigError,
    ModuleSetting,
    QuantConfig,
    module_key,
    parse_setting,
    pattern_matches,
)


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


@pytest.mark.parametrize("text,weights,bits", [
    ("skip", False, 16), ("fp", False, 16), ("FP", False, 16), ("w16a16", False, 16),
    ("a4", True, 4), ("a8", True, 8), ("a16", True, 16), ("w4a16", True, 16), ("w4a8", True, 8), ("w4a4", True, 4),
])
def test_module_settings_parse(text, weights, bits):
    assert parse_setting(text, 4) == ModuleSetting(weights=weights, act_bits=bits)


@pytest.mark.parametrize("text,match", [
    ("a3", "activations at 3 bits"), ("w8a8", "INT4 weights in this run|weights are INT4"), ("int8", "expected skip"),
    ("", "expected skip"),
])
def test_bad_module_settings(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_setting(text, 4)


@pytest.mark.parametrize("overrides,match", [
    (["*.o_proj"], "PATTERN=SETTING"), (["=a8"], "PATTERN=SETTING"), (["re:(=a8"], "not a regular expression"),
    (["*.o_proj=a5"], "5 bits"), ([3], "strings"),
])
def test_bad_overrides_fail_when_the_config_is_made(overrides, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(overrides=overrides)


def test_patterns_are_globs_or_regexes_on_the_layer_names_with_or_without_the_backbone_prefix():
    key = module_key(3, "mlp.down_proj")
    assert key == "layers.3.mlp.down_proj"
    for pattern in ("*.down_proj", "layers.3.*", "layers.[0-3].*", "model.layers.3.mlp.down_proj",
                    "re:layers\\.(3|7)\\..*", "re:.*down_proj"):
        assert pattern_matches(pattern, key), pattern
    for pattern in ("*.o_proj", "layers.4.*", "layers.3", "re:down_proj", "re:layers\\.1\\..*"):
        assert not pattern_matches(pattern, key), pattern


def test_the_last_matching_override_wins_and_unmatched_modules_keep_the_mode():
    c = QuantConfig(mode="w4a4a8", overrides=["*.down_proj=a4", "layers.0.*=skip", "layers.0.mlp.up_proj=w4a16"])
    assert c.module_setting("down_proj", "layers.1.mlp.down_proj") == ModuleSetting(act_bits=4)
    assert c.module_setting("down_proj", "layers.0.mlp.down_proj") == ModuleSetting(weights=False, act_bits=16)
    assert c.module_setting("reader", "layers.0.mlp.up_proj") == ModuleSetting(act_bits=16)
    assert c.module_setting("o_proj", "layers.1.self_attn.o_proj") == ModuleSetting(act_bits=8)  # the mode's
    assert c.module_setting("o_proj") == ModuleSetting(act_bits=8)
    assert not c.act_spec("reader", "layers.0.self_attn.q_proj").enabled
    assert c.act_spec("down_proj", "layers.1.mlp.down_proj").clip_ratio == c.a_clip
    assert QuantConfig.from_dict(c.to_dict()) == c and "3 per-module override(s)" in c.describe()
    assert QuantConfig.from_dict({k: v for k, v in c.to_dict().items() if k != "overrides"}).overrides == []


def test_an_override_that_quantizes_activations_turns_the_clip_steps_on_in_a_weight_only_run():
    assert not QuantConfig(mode="w4a16", a_clip_search=True).searches_act_clips
    c = QuantConfig(mode="w4a16", a_clip_search=True, overrides=["*.down_proj=a8"])
    assert c.quantizes_activations and c.searches_act_clips


def test_rank_overrides_give_o_proj_and_down_proj_their_own_ranks_apart_from_precision():
    c = QuantConfig(o_rank=8, down_rank=0, overrides=["layers.0.*.o_proj=rank0", "*.down_proj=rank16",
                                                       "layers.1.mlp.down_proj=RANK4", "*.down_proj=a8"])
    assert c.module_rank("o_proj", "layers.0.self_attn.o_proj") == 0
    assert c.module_rank("o_proj", "layers.1.self_attn.o_proj") == 8  # the configuration's
    assert c.module_rank("down_proj", "layers.0.mlp.down_proj") == 16
    assert c.module_rank("down_proj", "layers.1.mlp.down_proj") == 4
    assert c.module_rank("reader", "layers.0.mlp.up_proj") == 0 and c.module_rank("down_proj") == 0
    # a rank override does not change the precision, nor a precision override the rank
    assert c.module_setting("down_proj", "layers.1.mlp.down_proj") == ModuleSetting(act_bits=8)
    assert c.module_setting("o_proj", "layers.0.self_attn.o_proj") == ModuleSetting(act_bits=4)
    assert QuantConfig(method="quad", weights="rtn", a_clip_search=False, o_rank=0, down_smooth=0.0,
                       overrides=["*.o_proj=rank4"]).needs_layer_inputs
    with pytest.raises(ConfigError, match="rank<N>"):
        QuantConfig(overrides=["*.o_proj=rankx"])
