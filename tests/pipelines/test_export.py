"""``quadllm export --format compressed-tensors``: a rank-0 checkpoint written in the format and
loaded back by compressed-tensors' own code computes what quadllm's fake backend computes; what the
format cannot hold is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize_tiny, random_ids, tiny_tokenizer

import quadllm
from quadllm.cli.app import main
from quadllm.integrations import compressed_tensors as ct_reader
from quadllm.integrations.compressed_tensors import load_exported
from quadllm.io.compressed_tensors import EXPORT_FILE, equivalent_clip
from quadllm.io.stock_layout import to_stock_modules
from quadllm.pipelines.export import ExportError, export_compressed_tensors, logit_agreement

EXACT = equivalent_clip(4)
SHAPES = {"hadamard-heads": dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=128),
          "dct-heads": dict(hidden_size=48, num_attention_heads=3, head_dim=16, intermediate_size=96)}


def _checkpoint(tmp_path, name="src", arch="llama", shape="hadamard-heads", **config):
    config = {"method": "quarot", "weights": "rtn", "a_clip": EXACT, **config}
    model = quantize_tiny(arch, model_kwargs=SHAPES[shape], **config)
    return quadllm.save(model, tiny_tokenizer(), tmp_path / name)


def _stock_reference(ckpt):
    model, _, meta = quadllm.load(ckpt)
    to_stock_modules(model, {k: meta[k] for k in ("quant_config", "structure")})
    return model


@pytest.mark.parametrize("arch,shape", [("llama", "hadamard-heads"), ("qwen2", "dct-heads")])
def test_weight_only_export_computes_the_stock_models_logits(tmp_path, arch, shape):
    ckpt = _checkpoint(tmp_path, arch=arch, shape=shape, mode="w4a16")
    out = export_compressed_tensors(ckpt, tmp_path / "ct")
    exported, ref = load_exported(tmp_path / "ct"), _stock_reference(ckpt)
    ids = random_ids(2, 24)
    with torch.no_grad():
        got, want = exported(ids).logits, ref(ids).logits
    # the INT4 weights, scales, transforms, fused tables and norms carried over: float32 noise only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert out["check"]["stock_layout"]["max_abs_logit_diff"] < 1e-4 and out["approximations"] == []
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and set(qc["transform_config"]["config_groups"]) == {
        "quadllm_self_attn_o_proj", "quadllm_mlp_down_proj"}
    assert all(g["input_activations"] is None for g in qc["config_groups"].values())


@pytest.mark.parametrize("arch,shape", [("llama", "hadamard-heads"), ("qwen2", "dct-heads")])
def test_each_w4a4_linear_computes_what_quadllms_does(tmp_path, arch, shape):
    """Layer by layer on the same inputs: equal outputs. Each token's largest magnitude lands on one of
    the format's rounding ties (qmax + 0.5 steps), harmless when positive (both neighbours clamp to
    qmax) and decided by the scales' last bits when negative; the inputs are made so that after the
    online transform every token's extreme is positive, and then nothing is left to chance."""
    ckpt = _checkpoint(tmp_path, arch=arch, shape=shape, weights="gptq")
    export_compressed_tensors(ckpt, tmp_path / "ct")
    exported, ref = load_exported(tmp_path / "ct"), _stock_reference(ckpt)
    ours, theirs = dict(ref.named_modules()), dict(exported.named_modules())
    names = [n for n, m in ours.items() if n.endswith(("q_proj", "o_proj", "down_proj", "up_proj"))]
    assert len(names) == 8
    for name in names:
        lin = ours[name]
        y = torch.randn(2, 40, lin.in_features, generator=torch.Generator().manual_seed(3))
        top = y.gather(-1, y.abs().argmax(-1, keepdim=True))
        y = y * top.sign()  # every token's extreme positive
        x = y @ lin.transform.dense().to(y.dtype) if lin.transform is not None else y
        with torch.no_grad():
            want, got = lin(x), theirs[name](x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_w4a4_export_agrees_with_the_fake_backend_and_records_the_check(tmp_path):
    ckpt = _checkpoint(tmp_path, weights="gptq")
    out = export_compressed_tensors(ckpt, tmp_path / "ct", check_tokens=64)
    record = json.loads((tmp_path / "ct" / EXPORT_FILE).read_text())
    assert record["check"] == out["check"] and record["check"]["tokens"] == 64
    assert "pydoc" in record["check"]["text"]
    for ref in ("source", "stock_layout"):
        assert record["check"][ref]["top1_agreement"] >= 0.9 and record["check"][ref]["mean_kl"] < 1e-2
    # linear by linear, only rows whose largest input magnitude is negative may round the other way
    linears = record["check"]["linears"]
    assert linears["rows_agreeing"] >= 0.5 and linears["disagreeing_rows_at_a_negative_extreme"] == 1.0
    assert record["source"]["integrity"] == quadllm.load(ckpt)[2]["integrity"]
    assert (tmp_path / "ct" / "generation_config.json").is_file() and (tmp_path / "ct" / "tokenizer.json").is_file()


def test_logit_agreement_definitions():
    a = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0, 2.5], [0.0, 3.0, 0.0]]])
    got = logit_agreement(a, b)
    assert got["max_abs_logit_diff"] == 3.0 and got["mean_abs_logit_diff"] == pytest.approx(6.5 / 6)
    assert got["top1_agreement"] == 0.5
    p, q = a.log_softmax(-1).double(), b.log_softmax(-1).double()
    assert got["mean_kl"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()))


@pytest.mark.parametrize("config,reason", [
    ({"method": "quad", "rank": 8}, "rank 8"),
    ({"kv_bits": 4}, "--kv-bits 4"),
    ({"act_sym": False}, "asymmetric"),
    ({"down_rank": 4}, "--down-rank 4"),
    ({"overrides": ["*.down_proj=a8"]}, "per-module precisions"),
])
def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path, config, reason):
    ckpt = _checkpoint(tmp_path, **config)
    with pytest.raises(ExportError, match=reason):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_another_clip_needs_approximate_activations(tmp_path, capsys, caplog):
    ckpt = _checkpoint(tmp_path, a_clip=0.9)
    assert main(["export", "--format", "compressed-tensors", str(ckpt), str(tmp_path / "ct"), "-q"]) == 2
    assert len(caplog.records) == 1 and "--approximate-activations" in caplog.records[0].getMessage()
    assert not (tmp_path / "ct").exists()
    assert main(["export", "--format", "compressed-tensors", str(ckpt), str(tmp_path / "ct"), "-q",
                 "--approximate-activations", "--check-tokens", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert any("clip 0.9 at INT4" in a for a in result["approximations"]) and result["check"]["source"]


def test_outputs_are_never_overwritten_unless_an_earlier_export(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier quadllm export"):
        export_compressed_tensors(ckpt, foreign, check=False)
    with pytest.raises(ExportError, match="directory of its own"):
        export_compressed_tensors(ckpt, ckpt, check=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    export_compressed_tensors(ckpt, tmp_path / "ct", check=False)
    first = (tmp_path / "ct" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise ct_reader.ExportLoadError("the reload failed")
    monkeypatch.setattr(ct_reader, "load_exported", broken)
    with pytest.raises(ct_reader.ExportLoadError):  # a failed check keeps the earlier export as it was
        export_compressed_tensors(ckpt, tmp_path / "ct", check=True)
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ct")] == []
    assert json.loads((tmp_path / "ct" / EXPORT_FILE).read_text())["check"] is None


def test_a_missing_or_foreign_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", "--format", "compressed-tensors", str(tmp_path / "nope"), str(tmp_path / "ct")]) == 2
    assert main(["export", "--format", "compressed-tensors", str(tmp_path / "nope"), str(tmp_path / "ct"),
                 "--check-tokens", "0"]) == 2
    assert not (tmp_path / "ct").exists()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "x"}}))
    with pytest.raises(ct_reader.ExportLoadError, match="not a compressed-tensors checkpoint"):
        load_exported(tmp_path / "plain")


def test_a_stock_layout_checkpoint_exports_as_it_is(tiny_original, tmp_path):
    """``quantize``'s default layout (stock) needs no rewrite: the check compares with the source only."""
    ckpt = tmp_path / "stock"
    assert main(["quantize", "--model", str(tiny_original), "--method", "quarot", "--weights", "rtn",
                 "--a-clip", f"{EXACT:.10f}", "--calib-samples", "4", "--calib-seqlen", "16", "--out", str(ckpt),
                 "-q"]) == 0
    assert quadllm.load(ckpt)[2]["format_version"] == 2
    out = export_compressed_tensors(ckpt, tmp_path / "ct", check_tokens=64)
    assert set(out["check"]) == {"tokens", "text", "backend", "linears", "source"}
    assert out["check"]["linears"]["disagreeing_rows_at_a_negative_extreme"] == 1.0
