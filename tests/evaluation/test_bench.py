"""`quadllm bench`: shape parsing, the linear benchmark's records and its backend checks."""

from __future__ import annotations

import json

import pytest
import torch

from quadllm.cli import main
from quadllm.evaluation.speed import bench_linear, group_ops, parse_shapes, records_markdown, top_ops


def test_parse_shapes():
    assert parse_shapes("2048x4096x4096, 1X8x16") == [(2048, 4096, 4096), (1, 8, 16)]
    for bad in ("2048x4096", "ax1x1", "0x4x4"):
        with pytest.raises(ValueError, match="shape"):
            parse_shapes(bad)


def test_bench_linear_records_every_backend_against_fp32():
    records = bench_linear([(8, 64, 32), (4, 64, 16)], rank=8, backends=("fp32", "fake"), repeat=2, min_seconds=0,
                           hadamard_from=64)
    assert [(r["backend"], r["m"], r["k"], r["n"]) for r in records] == [
        ("fp32", 8, 64, 32), ("fake", 8, 64, 32), ("fp32", 4, 64, 16), ("fake", 4, 64, 16)]
    for r in records:
        assert r["median_ms"] > 0 and r["speedup_vs_fp32"] > 0 and r["device"] == "cpu"
        assert r["online_hadamard"] == (r["backend"] == "fake")  # k >= hadamard_from: a down_proj
    assert records[0]["speedup_vs_fp32"] == 1.0
    table = records_markdown(records, ["backend", "m", "median_ms", "missing"])
    assert table.splitlines()[0] == "| backend | m | median_ms | missing |" and table.count("| - |") == 4


def test_top_ops_profiles_the_call_and_group_ops_sums_by_group():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    ops = top_ops(lambda: torch.mm(a, b).div_(3.0), repeat=2, top=None)
    names = [o["op"] for o in ops]
    assert "aten::mm" in names and "aten::div_" in names
    mm = ops[names.index("aten::mm")]
    assert mm["calls_per_call"] == 1 and mm["self_ms_per_call"] > 0
    assert abs(sum(o["share"] for o in ops) - 1) < 0.01
    assert len(top_ops(lambda: torch.mm(a, b), repeat=1, top=1)) == 1
    records = [{"op": "aten::_int_mm", "self_ms_per_call": 5.0, "share": 0.5},
               {"op": "aten::aminmax", "self_ms_per_call": 1.0, "share": 0.1},
               {"op": "aten::div", "self_ms_per_call": 1.0, "share": 0.1},
               {"op": "aten::addmm_", "self_ms_per_call": 3.0, "share": 0.2},
               {"op": "aten::_scaled_dot_product_flash_attention_for_cpu", "self_ms_per_call": 0.5, "share": 0.05},
               {"op": "aten::silu", "self_ms_per_call": 0.5, "share": 0.05}]
    assert group_ops(records) == [
        {"group": "integer GEMM", "self_ms_per_call": 5.0, "share": 0.5},
        {"group": "float GEMM", "self_ms_per_call": 3.0, "share": 0.2},
        {"group": "activation quantization", "self_ms_per_call": 2.0, "share": 0.2},
        {"group": "attention", "self_ms_per_call": 0.5, "share": 0.05},
        {"group": "other", "self_ms_per_call": 0.5, "share": 0.05}]


def test_gpu_backend_is_benchmarked_on_cuda_only():
    for backend in ("gpu", "gpu-unfused"):
        with pytest.raises(ValueError, match="device='cuda'"):
            bench_linear([(4, 16, 16)], backends=(backend,), device="cpu")


def test_bench_linear_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend.*int4"):
        bench_linear([(4, 16, 16)], backends=("fp32", "int4"))
    assert main(["bench", "linear", "--shapes", "4x32x16", "--backends", "fp32,int4", "-q"]) == 2


def test_bench_cli_writes_json_and_rejects_gpu_for_models(tmp_path):
    out = tmp_path / "lin.json"
    assert main(["bench", "linear", "--shapes", "4x32x16", "--rank", "4", "--backends", "fp32,fake", "--repeat", "1",
                 "--json", str(out), "-q"]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["backend"] for r in records} == {"fp32", "fake"}
    assert main(["bench", "model", "--backends", "fake,gpu", "-q"]) == 2  # a clear error before any loading


def test_bench_model_times_the_checkpoint_in_bfloat16_too(tmp_path, tiny_original):
    from conftest import quantize_tiny, tiny_tokenizer

    from quadllm import save

    ckpt = save(quantize_tiny("llama", rank=4, weights="rtn"), tiny_tokenizer(), tmp_path / "q",
                original={"spec": str(tiny_original)})
    out = tmp_path / "model.json"
    assert main(["bench", "model", str(ckpt), "--prefill", "8", "--decode", "2", "--batch", "1", "--repeat", "1",
                 "--backends", "fake,fake-bf16", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert {r["variant"] for r in result["records"]} == {"fp32", "bf16", "fake", "fake-bf16"}
    assert set(result["weights_mb"]) == {"fp32", "bf16", "fake", "fake-bf16"}
    assert main(["bench", "model", str(ckpt), "--backends", "fake,int4", "-q"]) == 2
    assert main(["bench", "model", str(ckpt), "--heads", "float,int2", "-q"]) == 2
    # each quantized backend with each head precision, in one run
    assert main(["bench", "model", str(ckpt), "--prefill", "8", "--decode", "2", "--batch", "1", "--repeat", "1",
                 "--backends", "cpu-int8", "--heads", "float,bf16", "--json", str(out), "-q"]) == 0
    assert {r["variant"] for r in json.loads(out.read_text())["records"]} == {"fp32", "bf16", "cpu-int8",
                                                                               "cpu-int8 head-bf16"}
