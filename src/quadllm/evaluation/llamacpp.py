"""llama.cpp beside quadllm in one benchmark, through ``llama-cpp-python`` (an optional extra).

``pip install 'quadllm[llamacpp]'`` builds llama.cpp from source for this machine (tens of minutes
on two cores); nothing else in quadllm needs it. The records have the fields of
:func:`quadllm.evaluation.speed.bench_model`'s, measured the same way: a prefill of ``T`` random
tokens per sequence from an empty cache, and greedy decoding (argmax of each step's logits) of
``decode`` tokens after a 16-token prompt, with the same number of threads as torch. Batches of
several sequences go through llama.cpp's own batch API (one ``llama_decode`` call holds a token of
every sequence), as its server does.

:func:`requantized` makes the same GGUF in another llama.cpp type (``Q4_0``, ``Q8_0``) with
llama.cpp's own quantizer, once, into quadllm's cache.
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..io.files import cache_root

log = logging.getLogger(__name__)

__all__ = ["LLAMACPP_TYPES", "llamacpp_unavailable_reason", "requantized", "gguf_weight_bytes", "llamacpp_files",
           "bench_gguf"]

#: the llama.cpp types :func:`requantized` makes, by name
LLAMACPP_TYPES = {"Q4_0": 2, "Q8_0": 7}
#: llama.cpp's own defaults for its command-line tools: logical and physical batch
N_BATCH, N_UBATCH = 2048, 512


def llamacpp_unavailable_reason() -> str | None:
    """None when ``llama_cpp`` imports, else what to install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama-cpp-python is not installed: `pip install 'quadllm[llamacpp]'` (compiles llama.cpp for this "
                "machine, tens of minutes on two cores)")
    return None


def _lib():
    import llama_cpp

    if not getattr(_lib, "ready", False):
        llama_cpp.llama_backend_init()
        # llama.cpp logs every load to stderr; keep a reference to the callback for the process
        _lib.quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_lib.quiet, ctypes.c_void_p())
        _lib.ready = True
    return llama_cpp


def requantized(source: str | Path, qtype: str, threads: int | None = None) -> Path:
    """``source`` requantized by llama.cpp to ``qtype`` (:data:`LLAMACPP_TYPES`), kept under
    quadllm's cache; written to a temporary name and renamed, so an interrupted run leaves none."""
    if qtype not in LLAMACPP_TYPES:
        raise ValueError(f"llama.cpp type must be one of {', '.join(LLAMACPP_TYPES)}, not {qtype!r}")
    source = Path(source)
    st = source.stat()
    out = cache_root() / "llamacpp" / f"{source.stem}-{st.st_size}-{int(st.st_mtime)}-{qtype}.gguf"
    if out.is_file():
        return out
    lib = _lib()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = LLAMACPP_TYPES[qtype]
    params.allow_requantize = True  # the sources are quantized GGUF files already
    params.nthread = threads or os.cpu_count() or 1
    try:
        rc = lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {qtype} (return code {rc})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("llama.cpp requantized %s to %s: %s", source.name, qtype, out)
    return out


def gguf_weight_bytes(path: str | Path) -> tuple[int, str]:
    """Bytes of the tensors one decoded token reads from a GGUF file (all but the token embedding,
    of which a row is read, unless the model ties it to the output), and the types of its
    largest tensors (``Q4_1``, ``Q4_K/Q6_K``...)."""
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    total, by_type = 0, {}
    for t in reader.tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        total += int(t.n_bytes)
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    main = sorted(by_type, key=lambda k: -by_type[k])
    return total, "/".join(k for k in main if by_type[k] > 0.05 * total)


def llamacpp_files(source: str | Path, types: list[str]) -> dict[str, Path]:
    """The GGUF file of each asked type (``source``: the file as it is; or one of
    :data:`LLAMACPP_TYPES`, requantized), by the name its benchmark rows get."""
    files = {}
    for t in types:
        path = Path(source) if t == "source" else requantized(source, t)
        files[f"llama.cpp {gguf_weight_bytes(path)[1]}" + (" (source GGUF)" if t == "source" else "")] = path
    return files


class _Context:
    """One llama.cpp model and context for ``seqs`` sequences of up to ``n_ctx`` tokens each."""

    def __init__(self, path: Path, seqs: int, n_ctx: int, threads: int) -> None:
        lib = self.lib = _lib()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx * seqs
        cparams.n_batch, cparams.n_ubatch = N_BATCH, N_UBATCH
        cparams.n_seq_max = seqs
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} x {seqs} tokens for {path}")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(N_BATCH, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) tuples."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(self, i: int) -> int:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def prefill(self, ids: np.ndarray) -> None:
        """The prompts ``ids`` [seqs, T] from an empty cache, ``N_BATCH`` tokens per call, the
        logits of each sequence's last token computed."""
        self.clear()
        flat = [(int(ids[s, t]), t, s, t == ids.shape[1] - 1) for s in range(ids.shape[0]) for t in range(ids.shape[1])]
        for i in range(0, len(flat), N_BATCH):
            self.decode(flat[i:i + N_BATCH])
        self.lib.llama_synchronize(self.ctx)


def bench_gguf(path: str | Path, name: str, vocab: int, prefill: list[int], decode: int, batches: list[int],
               repeat: int = 3, threads: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Records ``{variant, phase, batch, tokens, median_ms, tokens_per_s}`` of llama.cpp on
    ``path`` (random token ids below ``vocab`` from ``seed``)."""
    threads = threads or torch.get_num_threads()
    rng = np.random.default_rng(seed)
    records = []
    for b in batches:
        ctx = _Context(Path(path), b, max(prefill + [16 + decode]) + 1, threads)
        try:
            for t in prefill:
                ids = rng.integers(0, vocab, (b, t))
                ctx.prefill(ids)  # warm-up
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    ctx.prefill(ids)
                    times.append(time.perf_counter() - t0)
                ms = 1000 * statistics.median(times)
                records.append({"variant": name, "phase": "prefill", "batch": b, "tokens": t, "median_ms": round(ms, 2),
                                "tokens_per_s": round(b * t / ms * 1000, 1)})
                log.info("%s prefill b=%d t=%d: %.1f ms", name, b, t, ms)
            if decode:
                prompt = rng.integers(0, vocab, (b, 16))

                def run() -> float:
                    ctx.prefill(prompt)
                    last = prompt.shape[1] - 1
                    nxt = [ctx.argmax(s * prompt.shape[1] + last) for s in range(b)]
                    t0 = time.perf_counter()
                    for step in range(decode):
                        ctx.decode([(nxt[s], prompt.shape[1] + step, s, True) for s in range(b)])
                        nxt = [ctx.argmax(s) for s in range(b)]
                    return (time.perf_counter() - t0) / decode

                run()
                ms = 1000 * statistics.median(run() for _ in range(repeat))
                records.append({"variant": name, "phase": "decode", "batch": b, "tokens": decode,
                                "median_ms": round(ms, 3), "tokens_per_s": round(b / ms * 1000, 1)})
                log.info("%s decode b=%d: %.2f ms/token", name, b, ms)
        finally:
            ctx.close()
    return records
