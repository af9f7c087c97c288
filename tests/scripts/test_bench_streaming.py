"""scripts/bench_streaming.py keeps one row per (layers, method, rank, weights) run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bs = pytest.importorskip("bench_streaming")


def _record(layers: int, weights: str, peak: int, wall: float = 60.0) -> dict:
    return {"command": f"python scripts/bench_streaming.py --layers {layers} --weights {weights}",
            "quantize_command": "quadllm quantize ...", "date": "2026-12-01", "machine": "test machine",
            "machine_memory_gb": 23.5, "layers": layers, "model_safetensors_gb": 16.06 if layers == 32 else 2.97,
            "peak_memory_mb": peak, "limit_mb": bs.LIMIT_MB, "under_limit": peak < bs.LIMIT_MB,
            "wall_seconds": wall, "weights": weights, "timings": {},
            "summary": {"method": "quad", "rank": 64, "peak_memory_mb": peak, "checkpoint_mb": 5000.0,
                        "size_vs_fp16": 0.311}}


def test_merge_runs_replaces_the_same_run_and_keeps_others(tmp_path):
    path = tmp_path / "streaming.json"
    runs = bs.merge_runs(path, _record(2, "gptq", 9000))
    path.write_text(json.dumps({"runs": runs}))
    runs = bs.merge_runs(path, _record(32, "rtn", 4000))
    path.write_text(json.dumps({"runs": runs}))
    runs = bs.merge_runs(path, _record(2, "gptq", 5500))  # a rerun replaces the first
    assert [(r["layers"], r["weights"], r["peak_memory_mb"]) for r in runs] == [(32, "rtn", 4000), (2, "gptq", 5500)]


def test_render_flags_runs_over_the_limit():
    md = bs.render([_record(32, "rtn", 4000, wall=1800), _record(2, "gptq", 7000)])
    rows = [line for line in md.splitlines() if line.startswith("| 16.06 GB") or line.startswith("| 2.97 GB")]
    assert len(rows) == 2
    assert "| 4000 MB | 6144 MB | yes | 30.0 min |" in rows[0]
    assert "| 7000 MB | 6144 MB | **no** |" in rows[1]
