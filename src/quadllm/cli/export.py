"""``quadllm export --format compressed-tensors CKPT OUT``: a rank-0 checkpoint in the format vLLM
serves with its own INT4 kernels (:mod:`quadllm.pipelines.export`)."""

from __future__ import annotations

import json

from ..pipelines.export import export_compressed_tensors
from .common import add_common

FORMATS = ("compressed-tensors",)


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="write a rank-0 (QuaRot) checkpoint in another library's format "
                                      "(compressed-tensors: vLLM's INT4 W4A4 kernels); checked by loading it back")
    e.add_argument("ckpt", help="quadllm checkpoint (rank 0: --method quarot)")
    e.add_argument("out", help="output directory (written atomically; only an earlier export is replaced)")
    e.add_argument("--format", choices=FORMATS, required=True, help="the target format")
    e.add_argument("--approximate-activations", action="store_true",
                   help="export a checkpoint whose activation clip ratios the format cannot express (quadllm's "
                        "default 0.9, searched or learned ratios) with the format's grid instead; the check "
                        "measures the difference")
    check = e.add_mutually_exclusive_group()
    check.add_argument("--check", dest="check", action="store_true", default=None,
                       help="load the export back with compressed-tensors and compare every linear and the "
                            "logits with the fake backend (default when compressed-tensors is installed)")
    check.add_argument("--no-check", dest="check", action="store_false", help="skip that check")
    e.add_argument("--check-tokens", type=int, default=256,
                   help="tokens of the embedded evaluation text the check runs on")
    add_common(e)


def cmd_export(args) -> int:
    result = export_compressed_tensors(args.ckpt, args.out, approximate_activations=args.approximate_activations,
                                       check=args.check, check_tokens=args.check_tokens)
    print(json.dumps(result, indent=2))
    return 0


HANDLERS = {"export": cmd_export}
