#!/usr/bin/env python
"""Write a random-weight Llama-3-8B-shaped checkpoint (bfloat16 safetensors, about 16 GB) for
testing streaming quantization on a model larger than memory.

Shapes are Llama-3-8B's (32 layers, hidden 4096, MLP 14336, 32 query and 8 KV heads, vocabulary
128256, untied head); weights are N(0, 0.02) with norm gains 1 and a few embedding channels
scaled up so that the residual stream has outlier channels, as real models do. The tokenizer is
SmolLM2's (offline; its ids are a subset of the vocabulary). Shards are written one at a time
(at most about 1 GB in memory) into a temporary directory that is renamed into place at the end.

    python scripts/make_random_llama8b.py --out runs/llama8b-random
    python scripts/make_random_llama8b.py --out runs/llama-tiny-random --layers 2 --hidden 256 --mlp 512  # quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

log = logging.getLogger("make_random_llama8b")


def llama3_8b_config(layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def _randn(shape: tuple[int, ...], g: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """N(0, std) in bfloat16, generated in row blocks so float32 temporaries stay small."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1))
    for i in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - i), *shape[1:]), generator=g) * std
        out[i:i + block.shape[0]] = block.to(torch.bfloat16)
    return out


def layer_tensors(i: int, cfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    d, m, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, d),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.num_attention_heads * hd),
        "mlp.gate_proj.weight": (m, d),
        "mlp.up_proj.weight": (m, d),
        "mlp.down_proj.weight": (d, m),
    }
    out = {p + k: _randn(s, g) for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    return out


def write(out: Path, cfg, seed: int) -> dict:
    from safetensors.torch import save_file

    from quadllm.io.sources import load_model

    out = out.expanduser().resolve()
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_hidden_layers + 2
    name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    try:
        emb = _randn((cfg.vocab_size, cfg.hidden_size), g)
        emb[:, :4] *= 40  # a few massive-activation channels, as in real LLMs
        parts = [("embedding", lambda: {"model.embed_tokens.weight": emb})]
        parts += [(f"layer {i}", lambda i=i: layer_tensors(i, cfg, g)) for i in range(cfg.num_hidden_layers)]
        parts += [("head", lambda: {"lm_head.weight": _randn((cfg.vocab_size, cfg.hidden_size), g),
                                    "model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)})]
        for k, (what, make) in enumerate(tqdm(parts, desc="shards", unit="shard")):
            tensors = make()
            save_file(tensors, str(tmp / name(k + 1, n)), metadata={"format": "pt"})
            weight_map.update({key: name(k + 1, n) for key in tensors})
            del tensors
            if what == "embedding":
                del emb
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg.save_pretrained(tmp)
        tok = load_model(None)[1]  # SmolLM2's tokenizer, offline
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"Random-weight Llama-3-8B-shaped model written by "
                                       f"scripts/make_random_llama8b.py (seed {seed}); not a language model.\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "bytes": total, "tensors": len(weight_map), "seed": seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    cfg = llama3_8b_config(args.layers, args.hidden, args.mlp, args.heads, args.kv_heads, args.vocab)
    info = write(Path(args.out), cfg, args.seed)
    log.info("wrote %s: %.2f GB in %.0f s", info["path"], info["bytes"] / 1e9, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
