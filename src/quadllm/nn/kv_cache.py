"""An integer KV cache: keys and values stored as 4- or 8-bit codes, not simulated.

A checkpoint quantized with ``--kv-bits 4`` or ``8`` fake-quantizes K and V inside attention
(:class:`quadllm.nn.modules.KVQuant`: per head and token, asymmetric, after an orthogonal rotation
of q and k). :class:`IntKVCache` is the real thing for generation: each new key (rotated) and
value is quantized once when it enters the cache and kept as codes (two per byte at 4 bits) with
an FP16 scale and an integer zero point per head and token; attention reads the dequantized
cache and skips its own quantization of exactly those tensors (the cache hands them over, and
:class:`KVQuant` recognizes them). Outputs therefore match the simulation up to the FP16
rounding of the scales, while the cache holds ``bits/16 + 4/(2 head_dim)`` of an FP16 cache (codes, FP16 scale, INT16
zero point).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["cache_kwarg", "quantize_kv", "dequantize_kv", "pack_uint4", "unpack_uint4", "IntKVLayer", "IntKVCache",
           "kv_bits_of", "make_cache", "cache_nbytes"]


def quantize_kv(x: torch.Tensor, bits: int, clip_ratio: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8 in ``[0, 2**bits - 1]``), scale and zero point (int16; per row of the last
    dimension) of :func:`quadllm.core.quantizers.fake_quant_kv`'s grid: ``fake_quant_kv(x) ==
    (codes - zero) * scale``."""
    levels = 2**bits - 1
    xmax = x.amax(dim=-1, keepdim=True) * clip_ratio
    xmin = x.amin(dim=-1, keepdim=True) * clip_ratio
    scale = ((xmax - xmin) / levels).clamp_min(1e-8)
    zero = torch.round(-xmin / scale).clamp(-32768, 32767)  # negative when every value is positive
    codes = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return codes.to(torch.uint8), scale, zero.to(torch.int16)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.to(dtype) - zero.to(dtype)) * scale.to(dtype)


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] of shape [..., n] (n even) into [..., n/2]: element ``2j`` in the low
    nibble, ``2j+1`` in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4 needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


class IntKVLayer(DynamicLayer):
    """One decoder layer's cache of integer keys and values ``[batch, kv_heads, tokens, head_dim]``."""
    def __init__(self, bits: int, clip_ratio: float, rotation: torch.Tensor | None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"an integer KV cache stores 4 or 8 bits, not {bits}")
        self.bits, self.clip_ratio, self.rotation = bits, clip_ratio, rotation
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.length = 0
        self.returned: tuple[weakref.ref, weakref.ref] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.parts = {name: [] for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")}
        self.is_initialized = True

    def _store(self, name: str, x: torch.Tensor) -> None:
        codes, scale, zero = quantize_kv(x, self.bits, self.clip_ratio)
        self.parts[name].append(pack_uint4(codes) if self.bits == 4 else codes)
        self.parts[f"{name}_scale"].append(scale.to(torch.float16))
        self.parts[f"{name}_zero"].append(zero)

    def _read(self, name: str) -> torch.Tensor:
        for part in (name, f"{name}_scale", f"{name}_zero"):  # one tensor per part, grown by concatenation
            if len(self.parts[part]) > 1:
                self.parts[part] = [torch.cat(self.parts[part], dim=-2)]
        codes = self.parts[name][0]
        if self.bits == 4:
            codes = unpack_uint4(codes)
        return dequantize_kv(codes, self.parts[f"{name}_scale"][0], self.parts[f"{name}_zero"][0], self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation is not None:
            key_states = key_states @ self.rotation.to(key_states.dtype)
        self._store("k", key_states)
        self._store("v", value_states)
        self.length += key_states.shape[-2]
        keys, values = self._read("k"), self._read("v")
        self.returned = (weakref.ref(keys), weakref.ref(values))  # what KVQuant must not quantize again
        return keys, values

    def handed_over(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether ``key`` and ``value`` are exactly the tensors the last update returned."""
        return self.returned is not None and self.returned[0]() is key and self.returned[1]() is value

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.parts, self.length, self.returned = {}, 0, None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the integer KV cache cannot be cropped")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (generation drops the sequences that ended)."""
        self.parts = {name: [t[indices] for t in ts] for name, ts in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.parts.values() for t in ts)


class IntKVCache(Cache):
    """A cache of :class:`IntKVLayer` for a quadllm model whose attention quantizes K and V."""
    def __init__(self, model: nn.Module) -> None:
        kvs = [m.quad_kv for m in model.modules() if getattr(m, "quad_kv", None) is not None]
        if not kvs:
            raise ValueError("this model does not quantize its KV cache (quantize with --kv-bits 4 or 8)")
        layers = []
        for kv in kvs:
            layer = IntKVLayer(kv.bits, kv.clip_ratio, None if kv.rotation is None else kv.rotation.detach())
            kv.int_cache = weakref.ref(layer)  # KVQuant skips its own quantization of what this layer returns
            layers.append(layer)
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its cache under (transformers 5 renamed it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_bits_of(model: nn.Module) -> int:
    """The KV bits the model's attention simulates (16: none)."""
    return min((m.quad_kv.bits for m in model.modules() if getattr(m, "quad_kv", None) is not None), default=16)


def make_cache(model: nn.Module) -> Cache | None:
    """An :class:`IntKVCache` for models with KV quantization at 4 or 8 bits, else None (the
    model's default cache)."""
    return IntKVCache(model) if kv_bits_of(model) in (4, 8) else None


def cache_nbytes(cache) -> int:
    """Bytes a cache holds (integer or float)."""
    if isinstance(cache, IntKVCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
