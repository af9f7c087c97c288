"""``quadllm models``: the known offline models, whether they are installed, and how to install them."""

from __future__ import annotations

import json

from ..io import registry
from .common import add_common


def add_parsers(sub) -> None:
    m = sub.add_parser("models", help="list the known offline models (names for --model) and how to install them")
    m.add_argument("--verify", action="store_true", help="hash every installed model's GGUF file now")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_common(m)


def cmd_models(args) -> int:
    rows = []
    for model in registry.KNOWN_MODELS.values():
        row = {"name": model.name, "aliases": list(model.aliases), "model": model.title, "facts": model.facts,
               "size_mb": round(model.size / 1e6, 1), "installed": registry.installed(model),
               "install": registry.install_command(model), "note": model.note}
        if args.verify and row["installed"]:
            row["verified"] = registry.verify_model(model)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "installed" if row["installed"] else "not installed"
        if "verified" in row:
            state += ", sha256 ok"
        aliases = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"{row['name']}{aliases}: {row['model']}, {row['size_mb']} MB, {state}")
        print(f"    {row['facts']}")
        if not row["installed"]:
            print(f"    install: {row['install']}")
        if row["note"]:
            print(f"    note: {row['note']}")
    return 0


HANDLERS = {"models": cmd_models}
