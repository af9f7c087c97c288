"""``quadllm convert OLD NEW``: a checkpoint of format 1 rewritten in the stock layout (format 2)."""

from __future__ import annotations

import json

from ..pipelines.convert import convert
from .common import add_common


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="rewrite an old checkpoint in the stock layout that transformers, lm-eval "
                                       "and vLLM load (the old one is kept)")
    c.add_argument("old", help="quadllm checkpoint of format version 1")
    c.add_argument("new", help="output directory (written atomically)")
    add_common(c)


def cmd_convert(args) -> int:
    print(json.dumps(convert(args.old, args.new), indent=2))
    return 0


HANDLERS = {"convert": cmd_convert}
