"""Checkpoint fingerprints: ``weights_hash`` of the checkpoints a fixed set of runs produces.

Run it on two commits and compare the JSON files: a change that claims to alter no behaviour
(a refactoring) must give the same hash for every row.

    python scripts/check_identical.py --out runs/identical-new.json            # tiny models, seconds
    python scripts/check_identical.py --smollm2 --out runs/identical-new.json  # + SmolLM2 (about 25 min)
    python scripts/check_identical.py --compare runs/identical-old.json runs/identical-new.json

Tiny rows: a random model of every architecture (``tests/conftest.py``) under several configurations
covering every per-layer step (QUAD, QuaRot, RTN; GPTQ and RTN weights; groups, act-order, KV4,
W4A4A8, the normalized moment), each quantized in memory and by streaming from a saved directory.
SmolLM2 rows: the README's settings (QUAD W4A4 r=64, GPTQ, 32 x 512 tokens of ``wiki.valid.tokens``)
through the command line, in memory and with ``--streaming on`` (from the converted GGUF's cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ARCHS, random_ids, tiny_model, tiny_tokenizer  # noqa: E402

from quadllm import QuantConfig, quantize, save  # noqa: E402
from quadllm.cli.invocation import child_argv  # noqa: E402
from quadllm.io.checkpoint import weights_hash  # noqa: E402
from quadllm.pipelines.streaming import quantize_streaming  # noqa: E402

TINY_CONFIGS = {
    "quad-r8-gptq": dict(method="quad", rank=8, weights="gptq"),
    "quarot-rtn-kv4": dict(method="quarot", weights="rtn", kv_bits=4),
    "rtn-w4a4a8": dict(method="rtn", weights="rtn", mode="w4a4a8"),
    "quad-r4-g16-actorder-w4a8-normalized": dict(method="quad", rank=4, weights="gptq", group_size=16,
                                                 act_order=True, mode="w4a8", moment="normalized", kv_bits=8),
    "quad-r8-gptq-clip-search": dict(method="quad", rank=8, weights="gptq", a_clip_search=True),
}
CALIB = dict(calib_samples=4, calib_seqlen=16, calib_batch=2)


def tiny_rows(work: Path) -> dict[str, str]:
    out = {}
    samples = random_ids(4, 16, seed=3)
    for arch in ARCHS:
        orig = work / f"orig-{arch}"
        tiny_model(arch, torch.float32, seed=0).save_pretrained(orig)
        tiny_tokenizer().save_pretrained(orig)
        for name, cfg in TINY_CONFIGS.items():
            model = tiny_model(arch, torch.float32, seed=0)
            quantize(model, QuantConfig(**cfg, **CALIB), samples, progress=False)
            save(model, tiny_tokenizer(), work / f"{arch}-{name}-mem")
            out[f"{arch} {name} in-memory"] = weights_hash(work / f"{arch}-{name}-mem")
            quantize_streaming(orig, QuantConfig(**cfg, **CALIB), samples, work / f"{arch}-{name}-stream",
                               tiny_tokenizer(), progress=False)
            out[f"{arch} {name} streaming"] = weights_hash(work / f"{arch}-{name}-stream")
            print(f"{arch} {name}: {out[f'{arch} {name} in-memory'][:12]} {out[f'{arch} {name} streaming'][:12]}",
                  flush=True)
    return out


def smollm2_rows(work: Path) -> dict[str, str]:
    flags = ["--method", "quad", "--rank", "64", "--mode", "w4a4", "--weights", "gptq", "--calib", "wikitext2",
             "--calib-samples", "32", "--calib-seqlen", "512", "--seed", "0"]
    cli = child_argv("quantize", "--layout", "quadllm", "-q")  # streaming's layout
    subprocess.run([*cli, *flags, "--streaming", "off", "--out", str(work / "smol-mem")], check=True)
    from quadllm.io.sources import gguf_cache_dir, resolve

    model_dir = gguf_cache_dir(Path(resolve(None).path))
    subprocess.run([*cli, *flags, "--streaming", "on", "--model", str(model_dir), "--out", str(work / "smol-stream")],
                   check=True)
    return {"SmolLM2 QUAD W4A4 r=64 GPTQ in-memory": weights_hash(work / "smol-mem"),
            "SmolLM2 QUAD W4A4 r=64 GPTQ streaming": weights_hash(work / "smol-stream")}


def compare(a: Path, b: Path) -> int:
    old, new = json.loads(a.read_text())["hashes"], json.loads(b.read_text())["hashes"]
    rows = sorted(set(old) | set(new))
    same = 0
    for row in rows:
        verdict = "same" if old.get(row) == new.get(row) else "DIFFERENT"
        same += verdict == "same"
        print(f"{verdict:9}  {row}: {str(old.get(row))[:16]} {str(new.get(row))[:16]}")
    print(f"{same} of {len(rows)} rows identical")
    return 0 if same == len(rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="JSON file for the hashes")
    p.add_argument("--smollm2", action="store_true", help="also the SmolLM2 rows (about 25 min on 2 cores)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    with tempfile.TemporaryDirectory(prefix="quadllm-identical-") as tmp:
        work = Path(tmp)
        hashes = tiny_rows(work)
        if args.smollm2:
            hashes.update(smollm2_rows(work))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    text = json.dumps({"commit": commit, "torch": torch.__version__, "hashes": hashes}, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
