#!/usr/bin/env python
"""The one device check of the ``gpu`` backend, for a lent GPU machine (see DEVELOPERS.md).

In one process: (1) the Triton kernels against their reference definitions and the float
simulation on the device (tests/test_gpu_backend.py, which runs everything for real there,
including the half-precision model test that skips on a CPU); (2) `bench_linear` on Llama-3-8B's
linear shapes at prefill (M=2048) and decode (M=1, 16) sizes: fp32, fp16 and bf16 cuBLAS against
the float simulation (`fake`) and the Triton W4A8/W4A4 kernel (`gpu`; `gpu-unfused` runs down_proj's
online Hadamard as torch matmuls instead of inside the quantize kernel), every call synchronized,
medians after warm-up. Writes results/gpu_linear.{json,md} (or --out), with the device's name.

    python scripts/gpu_check.py                 # about 2 minutes on an H200 after Triton's compiles
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from quadllm.backends.gpu import why_no_gpu  # noqa: E402
from quadllm.evaluation.speed import bench_linear, machine_description, records_markdown  # noqa: E402

# Llama-3-8B: q/k/v/o and gate/up read d=4096 (QUAD adds r=64 full-precision columns), down reads 14336
SHAPES = [(m, k, n) for m in (1, 16, 2048) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "gpu_linear"))
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    reason = why_no_gpu()
    if reason:
        raise SystemExit(f"gpu_check needs a CUDA device with Triton: {reason}")
    if not args.skip_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_gpu_backend.py")],
                             cwd=ROOT)
        if rc:
            raise SystemExit(f"the gpu backend's tests failed (exit {rc}): no timings are written")
    records = bench_linear(SHAPES, rank=64, backends=("fp32", "fp16", "bf16", "fake", "gpu", "gpu-unfused"), repeat=20,
                           min_seconds=0.2, device="cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
            "machine": machine_description(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    table = records_markdown(records, ["backend", "m", "k", "n", "median_ms", "gflops", "speedup_vs_fp32"])
    out.with_suffix(".md").write_text(f"# quantized linear on {meta['device']}\n\n`{meta['command']}` "
                                      f"({meta['machine']})\n\n{table}\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
