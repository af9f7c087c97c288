"""``quadllm finetune``: train a checkpoint's full-precision outlier weights (or LoRA)."""

from __future__ import annotations

import json

from ..finetune.config import FT_METHODS, LOSSES, TRAIN_SETS, FinetuneConfig
from ..finetune.job import run
from ..io.memory import peak_rss_mb
from .common import add_common, config_from_args


def add_parsers(sub) -> None:
    d = FinetuneConfig()
    f = sub.add_parser("finetune", help="train the full-precision outlier weights (or LoRA) of a checkpoint")
    f.add_argument("model", help="quadllm checkpoint directory to fine-tune")
    f.add_argument("--data", required=True, help="Alpaca / chat / GSM8K / text .jsonl, a .txt file, wikitext2 "
                   "(wiki.valid.tokens), ptb, pydoc, pysource, or a hub data set name")
    f.add_argument("--out", required=True, help="output checkpoint directory, or with --adapter-only a "
                   ".safetensors file")
    f.add_argument("--adapter-only", action="store_true", help="write only the trained tensors (tied to the base)")
    f.add_argument("--method", choices=FT_METHODS, default=d.method,
                   help="quad: outlier columns (+ scales); lora: peft LoRA with the same budget")
    f.add_argument("--train", choices=TRAIN_SETS, default=d.train)
    f.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="kd: distil the original model (KL to its next-token distribution; default); ce: "
                   "cross-entropy on the data's labels; kd+ce: both")
    f.add_argument("--teacher", default=None, help="teacher model for kd (default: the checkpoint's original)")
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument("--scales-lr-ratio", type=float, default=d.scales_lr_ratio)
    f.add_argument("--epochs", type=float, default=d.epochs)
    f.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    f.add_argument("--batch-size", type=int, default=d.batch_size)
    f.add_argument("--grad-accum", type=int, default=d.grad_accum)
    f.add_argument("--max-seqlen", type=int, default=d.max_seqlen)
    f.add_argument("--val-fraction", type=float, default=d.val_fraction)
    f.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out loss every N steps")
    f.add_argument("--warmup", type=float, default=d.warmup, help="share of the steps with linear warmup")
    f.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    f.add_argument("--weight-decay", type=float, default=d.weight_decay)
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="bfloat16: autocast")
    f.add_argument("--train-on-prompt", action="store_true", help="loss on prompts too, not only responses")
    f.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: matched to the budget)")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    f.add_argument("--save-every", type=int, default=d.save_every, help="save resumable state every N steps")
    f.add_argument("--limit", type=int, default=None, help="use at most N records")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    f.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="keep all activations for backward (faster, far more memory)")
    add_common(f)


def cmd_finetune(args) -> int:
    config = config_from_args(FinetuneConfig, args)
    summary = run(args.model, config, args.out, adapter_only=args.adapter_only, resume=args.resume,
                  data_dir=args.data_dir, progress=not args.quiet)
    summary["peak_memory_mb"] = round(peak_rss_mb())
    print(json.dumps(summary, indent=2, default=str))
    return 0


HANDLERS = {"finetune": cmd_finetune}
