"""``quadllm verify DIR``: is a checkpoint intact (every weight file's size and SHA-256 as written)?"""

from __future__ import annotations

import json
import time

from ..io.checkpoint import read_meta, verify_files
from .common import add_common


def add_parsers(sub) -> None:
    v = sub.add_parser("verify", help="check a checkpoint's weight files against the hashes recorded when written")
    v.add_argument("model", help="quadllm checkpoint directory")
    v.add_argument("--quick", action="store_true", help="sizes and headers only, no hashing")
    add_common(v)


def cmd_verify(args) -> int:
    t0 = time.perf_counter()
    result = verify_files(args.model, read_meta(args.model), full=not args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    ok = None if result["checked"] == "nothing" else True  # None: nothing recorded to check against
    print(json.dumps({"checkpoint": args.model, "ok": ok, **result}, indent=2))
    return 0


HANDLERS = {"verify": cmd_verify}
