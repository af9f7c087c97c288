"""The LoRA baseline: ``peft`` LoRA adapters on the quantized linears of a quadllm model.

The adapters (``lora_A`` [k, in], ``lora_B`` [out, k]) act on the linear's raw input in full
precision and add ``scaling · B A x`` to the quantized output, as QLoRA does; the quantized
weights and the activation quantizers stay in the loop. They are injected in place with
``peft.inject_adapter_in_model`` (the model keeps its class), on q/k/v/o/gate/up/down of every
decoder layer. :func:`rank_for_budget` picks the adapter rank whose parameter count is closest
to a given budget, so LoRA can be compared with outlier fine-tuning at equal size.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import get_adapter
from ..nn.modules import QuadLinear

__all__ = ["LoraSpec", "target_names", "lora_params_per_rank", "rank_for_budget", "inject_lora", "has_lora"]

LoraSpec = dict[str, Any]  # {"rank": int, "alpha": float, "targets": [str, ...]}


def _peft():
    try:
        import peft
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError as exc:
        raise ImportError("the LoRA baseline needs the `peft` library: pip install 'quadllm[finetune]'") from exc
    return peft, LoraLinear


def target_names(model: nn.Module) -> list[str]:
    """Names (relative to a decoder layer) of the linears that get adapters: every linear that
    reads the residual stream and every linear that writes it (q/k/v/o/gate/up/down)."""
    adapter = get_adapter(model)
    names = [n for g in adapter.reader_groups for n in g.linears] + list(adapter.writers)
    return list(dict.fromkeys(names))


def _quad_linears(model: nn.Module, targets: list[str]) -> list[QuadLinear]:
    adapter = get_adapter(model)
    out = []
    for layer in adapter.layers(model):
        for name in targets:
            mod = layer.get_submodule(name)
            out.append(mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod)
    return out


def lora_params_per_rank(model: nn.Module, targets: list[str] | None = None) -> int:
    """Trainable parameters one unit of LoRA rank adds: sum of (in + out) over the targets."""
    return sum(m.in_features + m.out_features for m in _quad_linears(model, targets or target_names(model)))


def rank_for_budget(model: nn.Module, budget: int, targets: list[str] | None = None) -> int:
    """The LoRA rank (at least 1) whose parameter count is closest to ``budget``."""
    per = lora_params_per_rank(model, targets)
    return max(1, round(budget / per))


def has_lora(model: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_modules())


def inject_lora(model: nn.Module, spec: LoraSpec) -> None:
    """Add LoRA adapters (B initialised to zero: the model's output is unchanged) in place."""
    peft, LoraLinear = _peft()

    class QuadLoraLinear(LoraLinear):
        """peft's LoRA linear around a :class:`QuadLinear` (never merged: the base is INT4)."""

        def _get_in_out_features(self, module: nn.Module):
            return module.in_features, module.out_features

    wanted = {id(m) for m in _quad_linears(model, list(spec["targets"]))}
    names = [name for name, m in model.named_modules() if id(m) in wanted]
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters")
    cfg = peft.LoraConfig(r=int(spec["rank"]), lora_alpha=float(spec["alpha"]), lora_dropout=0.0, bias="none",
                          target_modules=names)
    cfg._register_custom_module({QuadLinear: QuadLoraLinear})
    peft.inject_adapter_in_model(cfg, model)
    n = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    if n != len(names):
        raise RuntimeError(f"LoRA was injected into {n} modules, expected {len(names)}")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
