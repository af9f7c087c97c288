"""A rollout recipe: one file naming the model, the quantization, optional outlier fine-tuning, the
evaluations and the gates, run as stages by ``quadllm run`` (:mod:`quadllm.cli.run`).

This module holds what needs no model: reading and validating the whole recipe before any stage
runs (:func:`read_recipe`), each stage's input hash and the run's state file (a stage is done
when its recorded input hash is the current one and its output is still what it wrote), and the
gates' verdicts (:func:`check_gates`).

The recipe (YAML or TOML)::

    model: smollm2                 # anything --model takes (default: SmolLM2)
    output: runs/smollm2-rollout   # every stage's output goes under it
    quantize: {rank: 64, calib: wikitext2, calib_samples: 32, overrides: ["*.down_proj=a8"], plan: null}
    finetune: {data: alpaca.jsonl, max_steps: 200}   # optional; quadllm finetune's options
    evaluate:
      perplexity: {data: wikitext2, seqlen: 2048, max_windows: 8}
      tasks: {names: [piqa, arc_easy], limit: 100}
    gates: {kl_max: 0.8, ppl_ratio_max: 1.15, tasks_min_share: 0.95}
    report: {samples: 4, seqlen: 512}              # or false
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, QuantConfig
from ..finetune.config import FinetuneConfig
from ..io.files import atomic_write, sha256_file
from ..version import __version__

__all__ = ["Recipe", "RecipeError", "read_recipe", "GATES", "check_gates", "stage_hash", "RunState", "STAGES"]

STAGES = ("quantize", "finetune", "evaluate", "report")
#: gate name -> (the measured value it reads, the comparison, what it means)
GATES = {
    "kl_max": ("kl", "<=", "KL(FP ‖ model) per token on the perplexity data"),
    "ppl_max": ("ppl", "<=", "perplexity on the perplexity data"),
    "ppl_ratio_max": ("ppl_ratio", "<=", "perplexity over the FP model's"),
    "top1_min": ("top1_agreement", ">=", "top-1 agreement with the FP model"),
    "tasks_min_share": ("tasks_share", ">=", "task average as a share of the FP model's"),
}
TOP_KEYS = {"model", "output", "quantize", "finetune", "evaluate", "gates", "report", "seed"}
QUANTIZE_EXTRA = {"plan", "layout"}
PERPLEXITY_KEYS = {"data": None, "seqlen": 2048, "max_windows": 8}
TASK_KEYS = {"names": None, "limit": None, "batch_size": 8}
REPORT_KEYS = {"samples": 4, "seqlen": 512, "calib": None}


class RecipeError(ConfigError):
    """A recipe that cannot run, with the key at fault."""


@dataclass
class Recipe:
    """A validated recipe (:func:`read_recipe`)."""

    path: Path
    model: str | None
    output: Path
    quant: QuantConfig
    plan: str | None
    layout: str
    finetune: FinetuneConfig | None
    perplexity: dict[str, Any] | None
    tasks: dict[str, Any] | None
    gates: dict[str, float]
    report: dict[str, Any] | None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if (s != "finetune" or self.finetune) and (s != "report" or self.report))


def _section(data: dict, key: str, defaults: dict[str, Any], where: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"{where}.{key} must be a mapping, got {type(value).__name__}")
    unknown = set(value) - set(defaults)
    if unknown:
        raise RecipeError(f"{where}.{key}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **value}


def _dataclass(cls: type, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (ConfigError, ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def read_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe: every section, key and value, before anything runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path}: cannot read it ({exc})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} "
                          f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections at the top")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise RecipeError(f"recipe {path}: unknown sections {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    if not isinstance(data.get("output"), str) or not data["output"].strip():
        raise RecipeError(f"recipe {path}: 'output' (the directory for every stage) is required")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RecipeError(f"recipe {path}: 'model' must be a string")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"recipe {path}: 'seed' must be an integer")
    q = dict(data.get("quantize") or {})
    if not isinstance(data.get("quantize") or {}, dict):
        raise RecipeError("quantize must be a mapping of quadllm quantize's options")
    plan, layout = q.pop("plan", None), q.pop("layout", "auto")
    if layout not in ("auto", "stock", "quadllm"):
        raise RecipeError(f"quantize.layout must be auto, stock or quadllm, got {layout!r}")
    quant = _dataclass(QuantConfig, {"seed": seed, **q}, "quantize")
    ft_values = data.get("finetune")
    finetune = None
    if ft_values:
        if not isinstance(ft_values, dict) or not ft_values.get("data"):
            raise RecipeError("finetune needs at least 'data' (what quadllm finetune --data takes)")
        finetune = _dataclass(FinetuneConfig, {"seed": seed, **ft_values}, "finetune")
    evaluate = data.get("evaluate") or {}
    if not isinstance(evaluate, dict) or set(evaluate) - {"perplexity", "tasks"}:
        raise RecipeError("evaluate takes 'perplexity' and/or 'tasks'")
    perplexity = _section(evaluate, "perplexity", PERPLEXITY_KEYS, "evaluate")
    tasks = _section(evaluate, "tasks", TASK_KEYS, "evaluate")
    if tasks is not None:
        names = tasks["names"]
        names = [t.strip() for t in names.split(",")] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
            raise RecipeError("evaluate.tasks.names must name at least one task")
        tasks["names"] = names
    gates = data.get("gates") or {}
    if not isinstance(gates, dict):
        raise RecipeError("gates must be a mapping such as {kl_max: 0.8}")
    for name, value in gates.items():
        if name not in GATES:
            raise RecipeError(f"gates.{name}: unknown gate; known: {', '.join(GATES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"gates.{name} must be a number")
        needs = "tasks" if name == "tasks_min_share" else "perplexity"
        if (tasks if needs == "tasks" else perplexity) is None:
            raise RecipeError(f"gates.{name} reads evaluate.{needs}, which the recipe does not run")
    report = _section(data, "report", REPORT_KEYS, "recipe")
    if data.get("report") is True:
        report = dict(REPORT_KEYS)
    return Recipe(path, model, Path(data["output"]).expanduser(), quant, plan, layout, finetune, perplexity, tasks,
                  {k: float(v) for k, v in gates.items()}, report, data)


def stage_hash(stage: str, settings: Any, upstream: str | None) -> str:
    """What a stage's output depends on: its settings, the output it starts from, quadllm's version."""
    blob = json.dumps({"stage": stage, "settings": settings, "upstream": upstream, "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_or_dir_hash(path: Path) -> str:
    """A file's SHA-256, or a directory's over its files' names and hashes."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class RunState:
    """``run_state.json`` in the output directory: per stage, its input hash, output and output hash."""

    FILE = "run_state.json"

    def __init__(self, output: Path) -> None:
        self.path = output / self.FILE
        try:
            self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["stages"]
        except (OSError, ValueError, KeyError, TypeError):
            self.stages = {}

    def done(self, stage: str, inputs: str) -> bool:
        """Whether ``stage`` ran with these inputs and its output is still the one it wrote."""
        rec = self.stages.get(stage)
        if not rec or rec.get("inputs") != inputs:
            return False
        out = Path(rec["output"])
        return out.exists() and file_or_dir_hash(out) == rec.get("output_hash")

    def output_hash(self, stage: str) -> str | None:
        rec = self.stages.get(stage)
        return rec.get("output_hash") if rec else None

    def record(self, stage: str, inputs: str, output: Path, seconds: float) -> None:
        self.stages[stage] = {"inputs": inputs, "output": str(output), "output_hash": file_or_dir_hash(output),
                              "seconds": round(seconds, 1)}
        for later in STAGES[STAGES.index(stage) + 1:]:  # what came after ran on the old output
            self.stages.pop(later, None)
        atomic_write(self.path, (json.dumps({"stages": self.stages}, indent=2) + "\n").encode())


def check_gates(gates: dict[str, float], measured: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each gate's threshold, the measured value and whether it passed (a missing value fails)."""
    rows = []
    for name, threshold in gates.items():
        key, op, meaning = GATES[name]
        value = measured.get(key)
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        rows.append({"gate": name, "meaning": meaning, "threshold": threshold, "op": op, "value": value,
                     "passed": bool(ok)})
    return rows
