"""The command line: options become configs by field name, every QuadllmError is one line with exit
code 2, and ``--backend`` is never silently dropped."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

from quadllm.cli import app as cli_app
from quadllm.cli import build_parser, main
from quadllm.cli.common import config_from_args
from quadllm.config import ConfigError, QuantConfig
from quadllm.finetune.config import FinetuneConfig


def test_quantize_options_become_the_config_by_field_name():
    args = build_parser().parse_args(["quantize", "--out", "x", "--rank", "8", "--no-w-clip", "--act-order",
                                      "--group-size", "16", "--kv-bits", "4", "--moment", "normalized",
                                      "--a-clip-search"])
    cfg = config_from_args(QuantConfig, args)
    assert (cfg.rank, cfg.w_clip, cfg.act_order, cfg.group_size, cfg.kv_bits, cfg.moment, cfg.a_clip_search) == (
        8, False, True, 16, 4, "normalized", True)
    asym = config_from_args(QuantConfig, build_parser().parse_args(["quantize", "--out", "x", "--act-asym",
                                                                     "--down-rank", "16"]))
    assert (asym.act_sym, asym.down_rank) == (False, 16) and asym.act_spec("reader").sym is False
    assert asym.act_spec("reader").bits == 4 and QuantConfig(act_sym=False, mode="w4a16").act_spec("reader").sym
    default = config_from_args(QuantConfig, build_parser().parse_args(["quantize", "--out", "x"]))
    assert default == QuantConfig()  # the parser's defaults are the dataclass's
    paper = config_from_args(QuantConfig, build_parser().parse_args(
        ["quantize", "--out", "x", "--no-a-clip-search", "--o-rank", "0", "--down-smooth", "0"]))
    assert (paper.a_clip_search, paper.o_rank, paper.down_smooth) == (False, 0, 0.0)
    quarot = config_from_args(QuantConfig, build_parser().parse_args(["quantize", "--out", "x", "--method", "quarot"]))
    assert quarot == QuantConfig(method="quarot") and not quarot.a_clip_search


def test_every_finetune_field_has_its_option():
    args = build_parser().parse_args(["finetune", "ckpt", "--data", "d", "--out", "o", "--no-grad-checkpointing"])
    cfg = config_from_args(FinetuneConfig, args)
    assert cfg.grad_checkpointing is False and cfg.data == "d"
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} <= set(vars(args))
    assert config_from_args(FinetuneConfig, build_parser().parse_args(
        ["finetune", "ckpt", "--data", "d", "--out", "o"])) == FinetuneConfig(data="d")


def test_any_quadllm_error_is_one_line_and_exit_code_2(monkeypatch, caplog):
    def fails(args):
        raise ConfigError("what is wrong, and what to pass instead")

    monkeypatch.setitem(cli_app.HANDLERS, "generate", fails)
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        assert main(["generate", "m", "p", "-q"]) == 2
    assert [r.getMessage() for r in caplog.records] == ["what is wrong, and what to pass instead"]




def test_a_kernel_backend_on_an_original_model_is_an_error(tiny_original, caplog):
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        assert main(["generate", str(tiny_original), "hi", "--max-new-tokens", "1", "--backend", "cpu-int8",
                     "-q"]) == 2
    assert "original model" in caplog.text and "quantize it first" in caplog.text


def test_auto_backend_on_an_original_model_warns_and_runs(tiny_original, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="quadllm"):
        assert main(["generate", str(tiny_original), "hi", "--max-new-tokens", "1", "--backend", "auto"]) == 0
    assert "applies to quadllm checkpoints" in caplog.text


def test_the_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "quadllm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in out.stdout and "bench" in out.stdout


def test_eval_in_bfloat16_is_close_to_float32_and_says_so(tiny_original, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a small model reads the same words in two dtypes. " * 60)
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", str(tiny_original), "--data", str(text), "--seqlen", "32", "--max-windows", "2",
                     "--dtype", dtype, "--json", str(out), "-q"]) == 0
        results[dtype] = json.loads(out.read_text())
    assert results["bfloat16"]["dtype"] == "bfloat16" and results["float32"]["dtype"] == "float32"
    f32, bf16 = results["float32"]["ppl"], results["bfloat16"]["ppl"]
    assert f32 != bf16 and abs(bf16 - f32) / f32 < 0.05


def test_bfloat16_on_a_kernel_backend_is_an_error(tiny_original, caplog):
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        assert main(["generate", str(tiny_original), "hi", "--max-new-tokens", "1", "--backend", "cpu-int8",
                     "--dtype", "bfloat16", "-q"]) == 2
    assert "--dtype bfloat16 runs on the fake backend" in caplog.text
