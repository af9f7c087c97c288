"""llama.cpp beside quadllm (:mod:`quadllm.evaluation.llamacpp`), the weight bytes a decode step
reads and the memory-bandwidth bound (:mod:`quadllm.evaluation.speed`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import quantize_tiny, tiny_model

from quadllm.backends import place
from quadllm.cli import main
from quadllm.evaluation.llamacpp import bench_gguf, gguf_weight_bytes, llamacpp_unavailable_reason, requantized
from quadllm.evaluation.speed import add_bound, add_ratio, decode_weight_bytes, memory_bandwidth_gbs
from quadllm.nn.modules import QuadLinear

needs_llamacpp = pytest.mark.skipif(llamacpp_unavailable_reason() is not None,
                                    reason="llama-cpp-python is not installed (pip install 'quadllm[llamacpp]')")


def _write_gguf(path, tied: bool) -> dict[str, int]:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    tensors = {"token_embd.weight": np.zeros((10, 8), np.float32), "blk.0.attn_q.weight": np.zeros((8, 8), np.float16)}
    if not tied:
        tensors["output.weight"] = np.zeros((10, 8), np.float32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v.nbytes for k, v in tensors.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_weight_bytes_reads_the_embedding_only_when_it_is_the_head(tmp_path, tied):
    sizes = _write_gguf(tmp_path / "m.gguf", tied)
    total, types = gguf_weight_bytes(tmp_path / "m.gguf")
    expected = sum(sizes.values()) - (0 if tied else sizes["token_embd.weight"])
    assert total == expected
    assert types.split("/")[0] == "F32"


def test_requantize_refuses_unknown_types_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="Q4_0, Q8_0"):
        requantized(tmp_path / "missing.gguf", "Q3_K")


def test_decode_weight_bytes_counts_what_a_step_reads():
    model = tiny_model("llama", torch.float32)
    params = {p.data_ptr(): p for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    everything = sum(p.numel() * p.element_size() for p in params.values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert decode_weight_bytes(model) == everything + buffers - (0 if tied else embed.numel() * 4)
    # cpu-int4: each linear's INT4 layout, scales, outlier columns and bias instead of its codes
    q = quantize_tiny("llama", weights="rtn", method="quad", rank=8)
    place(q, "cpu-int4")
    lins = [m for m in q.modules() if isinstance(m, QuadLinear)]
    kernel_bytes = sum(m.kernel.decode_weight_bytes(m) for m in lins)
    codes_int4 = sum(m.out_features * (m.in_features - m.rank) / 2 for m in lins)
    layouts = sum(sum(t.numel() * t.element_size() for t in m.kernel.packed(m)[:2]) for m in lins)
    assert layouts >= codes_int4 and kernel_bytes > layouts
    place(q, "cpu-int8")
    int8_bytes = decode_weight_bytes(q)
    place(q, "cpu-int4")
    assert decode_weight_bytes(q) < int8_bytes  # half a byte per weight instead of one


def test_bound_and_ratios_are_their_definitions():
    records = [{"variant": "bf16", "phase": "decode", "batch": 2, "tokens": 8, "tokens_per_s": 20.0},
               {"variant": "q", "phase": "decode", "batch": 2, "tokens": 8, "tokens_per_s": 50.0, "compiled": True},
               {"variant": "q", "phase": "prefill", "batch": 1, "tokens": 8, "tokens_per_s": 500.0}]
    add_bound(records, {"q": 100_000_000}, bandwidth_gbs=10.0)
    assert records[1]["bound_tokens_per_s"] == 200.0 and records[1]["of_bound"] == 0.25  # 2 x 10 GB/s / 100 MB
    assert "of_bound" not in records[0] and "of_bound" not in records[2]
    add_ratio(records, "bf16", "vs_bf16")
    assert records[1]["vs_bf16"] == 2.5 and "vs_bf16" not in records[2]
    assert memory_bandwidth_gbs(megabytes=8, repeat=2) > 0


def test_bench_model_refuses_llamacpp_rows_it_cannot_make(tmp_path):
    assert main(["bench", "model", "--llamacpp", "Q3_K", "-q"]) == 2
    if llamacpp_unavailable_reason() is not None:
        assert main(["bench", "model", "--llamacpp", "source", "-q"]) == 2


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_rows_on_smollm2(smollm2, tmp_path):
    """The real library on the real GGUF: prefill and decode records, batch 1 and 2."""
    from quadllm.io.sources import resolve

    path = resolve(None).path
    records = bench_gguf(path, "llama.cpp", 49152, [32], 4, [1, 2], repeat=1)
    assert [(r["phase"], r["batch"]) for r in records] == [("prefill", 1), ("decode", 1), ("prefill", 2),
                                                          ("decode", 2)]
    assert all(r["tokens_per_s"] > 0 for r in records)
    q8 = requantized(path, "Q8_0")
    assert gguf_weight_bytes(q8)[1] == "Q8_0" and requantized(path, "Q8_0") == q8
    out = tmp_path / "b.json"
    assert main(["bench", "model", "--prefill", "16", "--decode", "2", "--batch", "1", "--repeat", "1", "--llamacpp",
                 "source", "--json", str(out), "-q"]) == 0
    rows = json.loads(out.read_text())["records"]
    assert any(r["variant"].startswith("llama.cpp") and "of_bound" in r for r in rows)
