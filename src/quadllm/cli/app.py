"""``quadllm``: the parser of every command and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import QuadllmError
from . import analysis, bench, convert, evaluate, export, finetune, harness, models, quantize, run, verify
from .common import setup_logging

log = logging.getLogger("quadllm")

COMMAND_GROUPS = (quantize, evaluate, finetune, analysis, run, bench, verify, convert, export, harness, models)
HANDLERS = {name: fn for group in COMMAND_GROUPS for name, fn in group.HANDLERS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quadllm", description="W4A4 quantization of LLMs with QUAD")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in harness.PASSTHROUGH:
        setup_logging(argparse.Namespace(verbose=False, quiet=False))
        return _guarded(lambda: harness.PASSTHROUGH[argv[0]](argv[1:]))
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return _guarded(lambda: HANDLERS[args.command](args))


def lm_eval_main() -> int:
    """``quadllm-lm-eval ARGS``: the same as ``quadllm lm-eval ARGS``."""
    return main(["lm-eval", *sys.argv[1:]])


def _guarded(run) -> int:
    """``run()``'s exit code; quadllm's errors become one logged line and their exit code."""
    try:
        return run()
    except QuadllmError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
