"""``quadllm``: the parser of every command and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import QuadllmError
from . import analysis, bench, convert, evaluate, finetune, models, quantize, verify
from .common import setup_logging

log = logging.getLogger("quadllm")

COMMAND_GROUPS = (quantize, evaluate, finetune, analysis, bench, verify, convert, models)
HANDLERS = {name: fn for group in COMMAND_GROUPS for name, fn in group.HANDLERS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadllm", description="W4A4 quantization of LLMs with QUAD")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    try:
        return HANDLERS[args.command](args)
    except QuadllmError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
