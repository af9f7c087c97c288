"""The command line: one module per command group, :mod:`.common` for what they share."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
