"""The compressed-tensors checkpoint format (what vLLM serves with its own INT4 kernels), as far as
quadllm writes it: pure functions, no import of the ``compressed-tensors`` package.

- **Weights** (``format: pack-quantized``): each quantized linear stores ``weight_packed``
  (int32, ``32 / bits`` codes per word along the input dimension, each code offset by
  ``2**(bits-1)`` into an unsigned nibble, the first column in the lowest bits), ``weight_scale``
  ``[out, groups]`` and ``weight_shape`` (int32 ``[out, in]``); ``w = code * scale``.
- **Activations**: dynamic, symmetric, per token. compressed-tensors' grid maps a token's largest
  magnitude to ``qmax + 0.5`` (``scale = max|x| / ((2**bits - 1) / 2)``, codes clamped to
  ``[-2**(bits-1), 2**(bits-1) - 1]``), where quadllm maps ``clip * max|x|`` to ``qmax``. The two
  are the same grid when ``clip = qmax / (qmax + 0.5)`` (:func:`equivalent_clip`: 14/15 at INT4);
  any other clip has no counterpart in the format.
- **Online transforms** (``transform_config``): an input transform of a linear multiplies its
  input by a stored matrix divided by ``sqrt(n)`` (both compressed-tensors' ``HadamardTransform``
  and vLLM's dense path); one tensor per scheme, stored at the first module it applies to
  (compressed-tensors' own saving ties the others to it).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

__all__ = ["EXPORT_FILE", "FORMAT", "QUANT_METHOD", "equivalent_clip", "pack_int32", "unpack_int32",
           "quantization_args", "config_group", "module_targets", "transform_weight", "transform_scheme",
           "transform_key", "quantization_config"]

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
#: what an export directory records of its source and of the check run on it
EXPORT_FILE = "quadllm_export.json"


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def equivalent_clip(bits: int) -> float:
    """The clip ratio of quadllm's per-token grid (``scale = clip * max|x| / qmax``) that equals
    compressed-tensors' (``scale = max|x| / (qmax + 0.5)``)."""
    return _qmax(bits) / (_qmax(bits) + 0.5)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [out, in] (int8 in ``[-2**(bits-1), 2**(bits-1) - 1]``) packed ``32 // bits``
    per int32 word along ``in`` (zero-padded), lowest bits first, each code stored as
    ``code + 2**(bits-1)``."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"pack_int32 expects 2-d int8 codes, got {codes.dtype} of {codes.dim()} dimensions")
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_int32: {bits}-bit codes do not fill a 32-bit word")
    offset = 1 << (bits - 1)
    if codes.numel() and (int(codes.min()) < -offset or int(codes.max()) >= offset):
        raise ValueError(f"pack_int32: codes outside [{-offset}, {offset - 1}]")
    per_word = 32 // bits
    out, inp = codes.shape
    u = (codes.to(torch.int64) + offset)
    u = torch.nn.functional.pad(u, (0, -inp % per_word)).reshape(out, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # < 2**32: exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 codes [out, in_features]."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    u = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :in_features] - (1 << (bits - 1))).to(torch.int8)


def quantization_args(bits: int, *, weights: bool, group_size: int = 0) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of quadllm's weights (symmetric INT, per output
    channel or per group, static) or input activations (symmetric INT, per token, dynamic)."""
    if weights:
        return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                "strategy": "group" if group_size else "channel", "group_size": group_size or None,
                "observer": None, "actorder": None}
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
            "group_size": None, "observer": None}


def module_targets(local_names: list[str]) -> list[str]:
    """A target matching the linears of every decoder layer named ``local_names`` (such as
    ``self_attn.q_proj``) and nothing else."""
    alternatives = "|".join(re.escape(n) for n in sorted(set(local_names)))
    return [f"re:.*\\.({alternatives})$"]


def config_group(local_names: list[str], w_bits: int, group_size: int, act_bits: int) -> dict[str, Any]:
    """One ``config_groups`` entry: these linears' weights at ``w_bits`` and their inputs at
    ``act_bits`` (16: not quantized)."""
    return {"targets": module_targets(local_names),
            "weights": quantization_args(w_bits, weights=True, group_size=group_size),
            "input_activations": None if act_bits >= 16 else quantization_args(act_bits, weights=False),
            "output_activations": None, "format": FORMAT}


def transform_weight(dense: torch.Tensor) -> torch.Tensor:
    """The stored matrix of an online input transform ``x -> x @ dense.T``: both readers compute
    ``x @ M / sqrt(n)``, so ``M = sqrt(n) * dense.T`` (a Hadamard transform's ±1 matrix)."""
    n = dense.shape[0]
    if dense.shape != (n, n):
        raise ValueError(f"an online transform is square, got {tuple(dense.shape)}")
    return (dense.to(torch.float64).T * math.sqrt(n))


def transform_scheme(local_names: list[str], sylvester: bool) -> dict[str, Any]:
    """A ``TransformScheme``: an online transform of these linears' inputs. ``sylvester``: the
    matrix is the Sylvester Hadamard matrix, which vLLM may apply with its fast kernel (type
    ``hadamard``); otherwise (type ``random-hadamard``) the readers apply the stored matrix densely."""
    return {"type": "hadamard" if sylvester else "random-hadamard",
            "apply": [{"targets": module_targets(local_names), "location": "input", "inverse": False,
                       "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "float32"}


def transform_key(module_name: str, scheme_name: str) -> str:
    """The tensor name of a scheme's matrix stored at ``module_name``."""
    return f"{module_name}.{scheme_name}_input.weight"


def quantization_config(groups: dict[str, dict[str, Any]], transforms: dict[str, dict[str, Any]],
                        ignore: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` of a compressed checkpoint."""
    config: dict[str, Any] = {"quant_method": QUANT_METHOD, "format": FORMAT, "config_groups": groups,
                              "ignore": ignore, "quantization_status": "compressed", "kv_cache_scheme": None,
                              "global_compression_ratio": None}
    if transforms:
        config["transform_config"] = {"config_groups": transforms}
    return config
