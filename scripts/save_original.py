"""The original (FP) model quadllm loads, saved as a float32 Hugging Face directory: what another engine
(vLLM, ``plugins/vllm/serve_check.py --fp``) serves as the FP baseline of an offline model.

    python scripts/save_original.py default runs/smollm2-fp-hf
    python scripts/save_original.py qwen2.5-coder-0.5b runs/qwen2.5-coder-0.5b-fp-hf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quadllm.io.sources import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="'default' (SmolLM2), a known offline model (`quadllm models`), a GGUF file or HF dir")
    p.add_argument("out", help="directory to write (config, float32 safetensors, tokenizer)")
    args = p.parse_args()
    model, tok, _ = load_model(None if args.model == "default" else args.model)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.out}: {type(model).__name__}, {next(model.parameters()).dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
