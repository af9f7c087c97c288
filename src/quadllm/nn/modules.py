"""The modules a QUAD model is made of, swapped into a transformers model in place of its own.

- :class:`QuadRMSNorm`: RMSNorm without gain (gains are fused into the next linears) that
  divides by the *original* hidden size, since the expanded stream keeps the original norm.
- :class:`QuadEmbedding`: the original embedding table followed by a fixed map into the
  (rotated, expanded) residual basis.
- :class:`QuadHead`: a fixed map back to the original basis (with the final norm's gain)
  followed by the original head, or by the embedding table when the model ties them: the
  table is then stored and held once, never duplicated.
- :class:`QuadLinear`: an optional online transform, per-token activation quantization of all
  but the first ``rank`` input coordinates, and an INT4 weight (packed codes and scales)
  plus the full-precision outlier columns ``w_outlier``.
- :func:`quad_attention`: transformers attention function that quantizes K and V per head and
  token (after an online Hadamard on q and k) when an attention module asks for it, and attends
  one decoded token without repeating grouped keys and values (:func:`one_token_gqa`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import ActSpec
from ..core.quantizers import (
    dequantize_weight,
    fake_quant_act,
    fake_quant_kv,
    fake_quant_weight,
    pack_int4,
    unpack_int4,
)
from .quant_linear import quant_linear

if TYPE_CHECKING:  # kernels are attached by quadllm.backends, which imports this module
    from ..backends.base import Kernel

ATTN_IMPLEMENTATION = "quadllm_sdpa"


class QuadRMSNorm(nn.Module):
    """``x / sqrt(sum(x²)/dim + eps)``: RMSNorm with a unit gain and a fixed divisor ``dim``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        var = xf.pow(2).sum(-1, keepdim=True) / self.dim
        return (xf * torch.rsqrt(var + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class QuadEmbedding(nn.Module):
    """Embedding lookup, then ``h = proj @ e`` (``proj`` is [d+r, d]; None means identity)."""

    def __init__(self, weight: torch.Tensor, proj: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.proj = None if proj is None else nn.Parameter(proj, requires_grad=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1] if self.proj is None else self.proj.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = F.embedding(ids, self.weight)
        if self.proj is None:
            return e
        return F.linear(e.to(self.proj.dtype), self.proj)


class QuadHead(nn.Module):
    """``logits = W @ (proj @ x)`` with ``proj`` [d, d+r] (None: identity).

    ``W`` is the head's own weight, or — for tied models — the embedding table of ``tied_to``,
    referenced but not registered, so it is stored and held once.
    """

    def __init__(self, proj: torch.Tensor | None, weight: torch.Tensor | None = None,
                 tied_to: QuadEmbedding | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if (weight is None) == (tied_to is None):
            raise ValueError("QuadHead needs exactly one of weight and tied_to")
        self.proj = None if proj is None else nn.Parameter(proj, requires_grad=False)
        self.own_weight = None if weight is None else nn.Parameter(weight, requires_grad=False)
        self._tied = (tied_to,) if tied_to is not None else ()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # set by quadllm.backends.place(head=...): the table in a cheaper precision, for inference
        self.kernel = None

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def table(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.own_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = F.linear(x.to(self.proj.dtype), self.proj)
        if self.kernel is not None:
            return self.kernel(x, self.bias)
        w = self.table()
        return F.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        return f"tied={self.tied}" + (f", head={self.kernel.precision}" if self.kernel is not None else "")


class QuadLinear(nn.Module):
    """A linear layer in the QUAD basis.

    Float state (before quantization): ``weight`` [out, in] in the transformed basis. Quantized
    state: ``qweight`` (INT4 codes packed two per byte, or int8 codes for 8-bit weights) and
    ``scales`` [out, G] for input columns ``rank:``, and ``w_outlier`` [out, rank]
    in full precision. The input is first passed through ``transform`` (an online Hadamard or
    head-mixing map) when set; activation quantization then applies to columns ``rank:``.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 0, bias: bool = False,
                 act: ActSpec | None = None, transform: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32, allocate: bool = True) -> None:
        super().__init__()
        if not 0 <= rank < in_features:
            raise ValueError(f"rank={rank} must be in [0, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.act = act or ActSpec()
        self.act_enabled = True
        self.transform = transform
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=dtype) if allocate else torch.empty(0, dtype=dtype),
            requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.w_bits = 16
        self.group_size = 0
        self.capture = None  # callable(x) seeing the transformed, unquantized input (calibration)
        self._deq: torch.Tensor | None = None
        self._deq_key: tuple | None = None
        # keep the dequantized weight between calls (fast inference); training turns it off
        # so that no float copy of the weights is held
        self.cache_dequantized = True
        # an execution kernel (quadllm.backends.Kernel) used for inference instead of the float simulation
        self.kernel: "Kernel | None" = None
        # a trainable clip ratio (a 0-d tensor) used instead of ``act.clip_ratio`` while
        # quadllm.steps.learned_clip trains it; never saved (set_act_clip stores the result)
        self.clip_param: torch.Tensor | None = None

    # --- construction ---------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.weight is None

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, w_outlier: torch.Tensor, w_bits: int,
                      group_size: int) -> None:
        """Switch to the quantized state with integer ``codes`` [out, in - rank]."""
        r = self.rank
        if codes.shape != (self.out_features, self.in_features - r):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features - r)}")
        dtype = self.bias.dtype if self.bias is not None else (self.weight.dtype if self.weight is not None
                                                               else torch.float32)
        self.weight = None
        packed = pack_int4(codes) if w_bits <= 4 else codes.to(torch.int8)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales.to(dtype))
        self.w_outlier = nn.Parameter(w_outlier.to(dtype).reshape(self.out_features, r), requires_grad=False)
        self.w_bits = w_bits
        self.group_size = group_size
        self._deq = None

    def allocate_quantized(self, w_bits: int, group_size: int, dtype: torch.dtype) -> None:
        """Empty quantized state of the right shapes (for loading a checkpoint)."""
        nq = self.in_features - self.rank
        groups = nq // group_size if group_size else 1
        self.set_quantized(torch.zeros(self.out_features, nq, dtype=torch.int8),
                           torch.ones(self.out_features, groups, dtype=dtype),
                           torch.zeros(self.out_features, self.rank, dtype=dtype), w_bits, group_size)

    def codes(self) -> torch.Tensor:
        nq = self.in_features - self.rank
        return unpack_int4(self.qweight, nq) if self.w_bits <= 4 else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """Float weight of the quantized columns (cached until the quantized state changes)."""
        key = (self.scales.dtype, self.scales._version, self.qweight._version)
        if self._deq is not None and self._deq_key == key:
            return self._deq
        w = dequantize_weight(self.codes(), self.scales.detach(), self.scales.dtype)
        if self.cache_dequantized:
            self._deq, self._deq_key = w, key
        return w

    def outlier_weight(self) -> torch.Tensor:
        """The weight of the first ``rank`` columns as it computes: ``w_outlier``, or with
        ``act.outlier_bits`` < 16 its round-to-nearest per output channel at those bits (stored on
        that grid already; the rounding here keeps fine-tuning, straight through, on it)."""
        bits = self.act.outlier_bits
        return self.w_outlier if bits >= 16 else fake_quant_weight(self.w_outlier, bits)

    def outlier_input(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``rank`` columns of the (transformed) input ``x`` as the linear reads them: as
        they are, or per token at ``act.outlier_bits`` when activations are quantized."""
        xr = x[..., :self.rank]
        bits = self.act.outlier_bits
        return fake_quant_act(xr, bits) if bits < 16 and self.rounds_input else xr

    def full_weight(self) -> torch.Tensor:
        """[out, in]: the float weight, or outlier columns then dequantized columns."""
        if not self.quantized:
            return self.weight
        return torch.cat([self.outlier_weight(), self.dequantized_weight()], dim=1)

    def drop_dequantized(self) -> None:
        """Forget the cached dequantized weight (after the quantized state changed in place)."""
        self._deq = None

    @property
    def holds_dequantized(self) -> bool:
        return self._deq is not None

    def set_act_clip(self, clip: float) -> None:
        """Quantize this linear's input with its own clip ratio (``--a-clip-search``), held in the
        float32 buffer ``act_clip`` so that a checkpoint carries it and loading restores it."""
        if "act_clip" in self._buffers:
            self.act_clip.fill_(float(clip))
        else:
            self.register_buffer("act_clip", torch.tensor(float(clip), dtype=torch.float32))
        self.act = dataclasses.replace(self.act, clip_ratio=float(clip))

    @property
    def rounds_input(self) -> bool:
        """Whether the input is quantized now (its spec asks for it, and calibration has not switched
        it off)."""
        return self.act.enabled and self.act_enabled

    def act_clip_ratio(self) -> float | torch.Tensor:
        """The clip ratio the activation quantizer uses now: the one being trained, else ``act``'s."""
        return self.act.clip_ratio if self.clip_param is None else self.clip_param

    def adopt_loaded_state(self) -> None:
        """After tensors were put in place (by ``load_state_dict``, or by a loader that sets them
        directly, as transformers does): the stored clip ratio becomes the quantizer's, and no
        dequantized weight from before is kept."""
        self._deq = None
        if self._buffers.get("act_clip") is not None:
            self.act = dataclasses.replace(self.act, clip_ratio=float(self.act_clip))

    def _load_from_state_dict(self, *args, **kwargs):
        result = super()._load_from_state_dict(*args, **kwargs)
        self.adopt_loaded_state()
        return result

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        quant_act = self.rounds_input
        use_kernel = self.kernel is not None and quant_act and self.quantized and not (
            torch.is_grad_enabled() and (x.requires_grad or self.w_outlier.requires_grad
                                         or self.scales.requires_grad))
        if use_kernel and self.transform is not None and self.capture is None:
            y = self.kernel.fused_call(self, x)  # a kernel that applies the transform itself
            if y is not None:
                return y
        if self.transform is not None:
            x = self.transform(x)
        if self.capture is not None:
            self.capture(x)
        if use_kernel:
            return self.kernel(self, x)
        if not self.quantized:
            if quant_act:
                a, c = self.act, self.act_clip_ratio()
                x = torch.cat([self.outlier_input(x), fake_quant_act(x[..., r:], a.bits, c, a.sym)], -1) \
                    if r else fake_quant_act(x, a.bits, c, a.sym)
            return F.linear(x, self.weight, self.bias)
        xq = x[..., r:]
        if quant_act:
            xq = fake_quant_act(xq, self.act.bits, self.act_clip_ratio(), self.act.sym)
        if torch.is_grad_enabled() and (xq.requires_grad or self.scales.requires_grad):
            # training: dequantize inside forward and backward, keep no float weight around
            y = quant_linear(xq, self.qweight, self.scales, self.in_features - r, self.w_bits)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(xq, self.dequantized_weight(), self.bias)
        if r:
            y = y + F.linear(self.outlier_input(x), self.outlier_weight())
        return y

    def extra_repr(self) -> str:
        state = f"W{self.w_bits}" + (f" g{self.group_size}" if self.group_size else "") if self.quantized else "float"
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, {state}, "
                f"A{self.act.bits}{'' if self.act.sym else ' asym'} clip={self.act.clip_ratio}, bias={self.bias is not None}")


class KVQuant(nn.Module):
    """Attached to an attention module as ``quad_kv``: K and V fake-quantized per head and
    token; q and k first rotated by an orthogonal ``rotation`` [head_dim, head_dim]
    (q kᵀ unchanged) to spread outliers of K."""

    def __init__(self, bits: int, clip_ratio: float, rotation: torch.Tensor | None) -> None:
        super().__init__()
        self.bits = bits
        self.clip_ratio = clip_ratio
        self.rotation = None if rotation is None else nn.Parameter(rotation, requires_grad=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cache = self.int_cache() if getattr(self, "int_cache", None) is not None else None
        if cache is not None and cache.handed_over(k, v):
            # an integer cache (quadllm.nn.kv_cache) already rotated and quantized these keys and values
            return (q @ self.rotation.to(q.dtype) if self.rotation is not None else q), k, v
        if self.rotation is not None:
            rot = self.rotation.to(q.dtype)
            q, k = q @ rot, k @ rot
        return q, fake_quant_kv(k, self.bits, self.clip_ratio), fake_quant_kv(v, self.bits, self.clip_ratio)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip_ratio}, rotated={self.rotation is not None}"


def quad_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, **kwargs):
    """SDPA attention, with KV quantization when ``module.quad_kv`` is set."""
    kv = getattr(module, "quad_kv", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] == 1 and not kwargs.get("dropout") and not kwargs.get("output_attentions")
            and kwargs.get("position_bias") is None and (attention_mask is None or attention_mask.shape[1] == 1)):
        return one_token_gqa(query, key, value, attention_mask, groups, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def one_token_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  groups: int, scale: float | None) -> torch.Tensor:
    """Attention of one query token per sequence, ``query`` [b, heads, 1, d], over keys and values
    with ``heads // groups`` heads [b, kv_heads, L, d]: the ``groups`` query heads of each KV head
    become that head's query rows, so the keys and values are read as they are. Output [b, 1, heads, d].

    transformers does the same when eager but repeats the keys and values to every query head under
    ``torch.compile``, which copies the whole static cache of each layer at every decoded token.
    ``mask`` [b, 1, 1, L] (or None) broadcasts over the query rows. The packing is written out rather
    than taken from transformers' ``pack_gqa``: the vLLM plugin's environment pins a transformers
    that does not have it."""
    b, heads, _, d = query.shape
    out = F.scaled_dot_product_attention(query.reshape(b, heads // groups, groups, d), key, value,
                                         attn_mask=mask, scale=scale)
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous()


def register_attention() -> None:
    """Make ``quad_attention`` available to transformers under :data:`ATTN_IMPLEMENTATION`."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, quad_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_quad_attention(model: nn.Module) -> None:
    """Run ``model``'s attention through :func:`quad_attention` (KV quantization when attached)."""
    register_attention()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
