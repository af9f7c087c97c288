"""Decoding with a static KV cache and the one-token step compiled by ``torch.compile`` (inductor).

Decoding one token of a small model on a CPU is bound by the framework more than by its weights:
eagerly, SmolLM2's step is some 16,000 operator calls (scripts/decode_int4_check.py profiles it), each
with its Python and dispatch cost, for 16 ms of operator time. Compiled, the per-token activation
quantization, the online transforms, norms, rotary embeddings and epilogues become a few fused C++
loops and the step runs as one graph; the GEMMs stay the kernels' own calls (the INT4 / INT8 GEMMs
and the head's). The step's shapes are fixed (batch and cache length), so it compiles once per
:class:`CompiledDecoder`; the prompt runs eagerly, since its length changes from call to call.

The kernels' kept weight layouts are built before compiling (:meth:`Kernel.prepare`) and used as
they are inside the graph: a decoder is for fixed weights, so make a new one after they change.
That contract lets the step run without dynamo's guards: checking the model's attributes and
tensors before every token took 2.4 ms of SmolLM2's 19.6 ms step ("TorchDynamo Cache Lookup" in
the decode profile of ``scripts/bench_cpu.py --models``, results/bench_cpu_models.md at 94c52f6). Each decoder
compiles its own copy of the step's code, so that dynamo's cache for that code holds this
decoder's graph alone and no guard is needed to tell two decoders (or two models) apart; the
shapes are checked by the decoder itself.
What compiling may change in the arithmetic (fused loops can vectorize a reduction differently)
is measured against the eager step in the tests, never assumed.

The step runs through inductor's C++ wrapper (``cpp_wrapper``) rather than its Python one: a
decode step of a small model is hundreds of calls (SmolLM2: 120 INT4 GEMMs, 90 outlier GEMMs,
attention, the fused loops), each of which the Python wrapper calls from Python
(``scripts/compile_wrapper_probe.py`` times the two wrappers against each other). The entry and the kernels are built separately
(``cpp_wrapper_build_separate``), which inductor offers to keep the entry's compile short; the
compile seconds each run paid are in the benchmarks' results files. The logits are the same either way (the same kernels in the same
order; tested). Where the C++ wrapper cannot be built, the step falls back to the Python wrapper
and says so in the log.
"""

from __future__ import annotations

import itertools
import logging
import time
import types
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.exc import InductorError
from transformers import StaticCache

from ..errors import QuadllmError
from ..nn.kv_cache import cache_kwarg, make_cache
from ..nn.modules import QuadLinear

log = logging.getLogger(__name__)

__all__ = ["CompiledDecoder", "CompileError"]

_STEP_IDS = itertools.count()


class CompileError(QuadllmError, ValueError):
    """A model the compiled decoder cannot run."""


class CompiledDecoder:
    """Greedy decoding of ``batch`` sequences of up to ``max_len`` tokens (prompt included) with a
    static KV cache; the one-token step is compiled at its first call (tens of seconds), through
    inductor's C++ wrapper unless ``cpp_wrapper`` is False (the Python one; see the module's docstring)."""

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1, cpp_wrapper: bool = True) -> None:
        if max_len < 2 or batch < 1:
            raise CompileError(f"a compiled decoder needs max_len >= 2 and batch >= 1, got {max_len} and {batch}")
        if make_cache(model) is not None:
            raise CompileError("compiled decoding does not take the integer KV cache of this checkpoint "
                               "(--kv-bits 4); decode it without --compile")
        self.model = model.eval()
        self.max_len = max_len
        self.batch = batch
        for m in model.modules():
            if isinstance(m, QuadLinear) and m.kernel is not None:
                m.kernel.prepare(m)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.length = 0
        self._cache_arg = cache_kwarg(model)
        self.compile_seconds: float | None = None
        self.cpp_wrapper = cpp_wrapper
        self._step = _compiled_step(model, cpp_wrapper)

    def reset(self) -> None:
        """Forget the sequences (the cache's memory is kept for the next ones)."""
        self.cache.reset()
        self.length = 0

    def _check(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise CompileError(f"this decoder takes [{self.batch}, tokens] token ids, got {tuple(ids.shape)}")
        if self.length + ids.shape[1] > self.max_len:
            raise CompileError(f"{self.length + ids.shape[1]} tokens exceed the decoder's max_len {self.max_len}")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` [batch, T] eagerly into the cache (after :meth:`reset`); the
        logits of its last position [batch, vocab]."""
        self.reset()
        self._check(ids)
        pos = torch.arange(ids.shape[1])
        out = self.model(input_ids=ids, cache_position=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: self.cache})
        self.length = ids.shape[1]
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence, ``ids`` [batch, 1], through the compiled step: the next logits."""
        self._check(ids)
        if ids.shape[1] != 1:
            raise CompileError(f"step takes one token per sequence, got {ids.shape[1]}")
        first = self.compile_seconds is None
        t0 = time.perf_counter()
        kwargs = {"input_ids": ids, "cache_position": torch.tensor([self.length]), "use_cache": True,
                  self._cache_arg: self.cache}
        try:
            out = self._call_step(kwargs, first)
        except (TorchDynamoException, InductorError) as exc:
            raise CompileError(f"torch.compile could not compile this model's decode step: {_first_line(exc)}") from exc
        if first:
            self.compile_seconds = time.perf_counter() - t0
            log.info("compiled the decode step (batch %d, cache %d) in %.0f s", self.batch, self.max_len,
                     self.compile_seconds)
        self.length += 1
        return out.logits[:, -1]

    def _call_step(self, kwargs: dict, first: bool):
        """The compiled step; a first call whose C++ wrapper does not build compiles again with the
        Python wrapper."""
        try:
            return self._step(**kwargs)
        except (TorchDynamoException, InductorError) as exc:
            if not (first and self.cpp_wrapper):
                raise
            log.warning("the C++ wrapper of the decode step did not build (%s); using the Python wrapper",
                        _first_line(exc))
            self.cpp_wrapper = False
            self._step = _compiled_step(self.model, False)
            return self._step(**kwargs)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of the prompts ``ids``: the new tokens [batch, <= max_new_tokens]
        (stops early once every sequence has produced ``eos_token_id``)."""
        logits = self.prefill(ids)
        new, done = [], torch.zeros(self.batch, dtype=torch.bool)
        for i in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            new.append(token)
            if eos_token_id is not None:
                done |= token[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.cat(new, 1) if new else ids.new_zeros(self.batch, 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _compiled_step(model: nn.Module, cpp_wrapper: bool) -> Callable:
    """``model``'s forward compiled without guards (see the module's docstring), through inductor's
    C++ wrapper when ``cpp_wrapper``."""
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe, "cpp_wrapper": cpp_wrapper}
    if cpp_wrapper:
        options["cpp_wrapper_build_separate"] = True
    return torch.compile(_own_step(model), dynamic=False, fullgraph=True, options=options)


def _own_step(model: nn.Module) -> Callable:
    """``model(**kwargs)`` behind a code object of its own: dynamo keeps its compiled graphs per code
    object, so this one's cache holds one decoder's graph and goes away with the decoder."""
    def step(**kwargs):
        return model(**kwargs)

    code = step.__code__.replace(co_name=f"quadllm_decode_step_{next(_STEP_IDS)}")
    return types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
