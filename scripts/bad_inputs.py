"""Bad inputs, tried as a user would: each case runs the ``quadllm`` command line in its own process
on tiny random models (seconds each) and records its exit code, its last error line and its time.

    python scripts/bad_inputs.py --out results/bad_inputs.md

The table is what the README's "Errors" paragraph promises: one line and exit code 2, before any
expensive work, nothing left behind. Cases that need root (a small tmpfs for the full disk) say so
when they cannot run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import quantize_tiny, tiny_model, tiny_tokenizer  # noqa: E402

from quadllm import save  # noqa: E402
from quadllm.cli.invocation import child_argv  # noqa: E402
from quadllm.evaluation.tasks.sandbox import run_python  # noqa: E402


def cli(*args: str, cwd: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(child_argv(*args, "-q"), capture_output=True, text=True, cwd=cwd)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "it/s]" not in line]
    return r.returncode, (lines[-1] if lines else r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""), \
        time.perf_counter() - t0


def build(work: Path) -> dict[str, Path]:
    orig = work / "orig"
    tiny_model("llama", torch.float32).save_pretrained(orig)
    tiny_tokenizer().save_pretrained(orig)
    ckpt = work / "ckpt"
    save(quantize_tiny("llama", method="quad", rank=8, weights="rtn"), tiny_tokenizer(), ckpt)
    return {"orig": orig, "ckpt": ckpt}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 1
    path.write_bytes(bytes(data))


def cases(work: Path, m: dict[str, Path]):
    orig, ckpt = m["orig"], m["ckpt"]
    q = ["quantize", "--model", str(orig), "--calib-samples", "4", "--calib-seqlen", "16", "--weights", "rtn",
         "--rank", "8"]

    d = copy(ckpt, work / "no-meta")
    (d / "quadllm_config.json").unlink()
    yield "checkpoint without quadllm_config.json (eval)", ("eval", str(d), "--seqlen", "16", "--max-windows", "1")

    d = copy(ckpt, work / "flipped")
    flip_a_data_byte(d / "model.safetensors")
    yield "one flipped bit in the tensor data, numbers stay finite (eval)", ("eval", str(d), "--seqlen", "16",
                                                                             "--max-windows", "1")
    yield "the same checkpoint through `quadllm verify`", ("verify", str(d))

    d = copy(ckpt, work / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    yield "truncated weights file (eval)", ("eval", str(d), "--seqlen", "16", "--max-windows", "1")

    d = copy(orig, work / "orig-missing")
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    yield "original model missing a tensor (quantize)", (*q[:2], str(d), *q[3:], "--out", str(work / "o1"))

    yield "--data path that does not exist (eval, before loading)", ("eval", str(ckpt), "--data",
                                                                     str(work / "wiki.test.raw"))
    tok = work / "wiki.valid.tokens"
    tok.write_text(" = Valid = \n" + "some plain calibration text . " * 200)
    yield "--calib wiki.valid.tokens (a plain-text file by another name)", (*q, "--calib", str(tok), "--out",
                                                                           str(work / "o2"))
    bad = work / "latin1.txt"
    bad.write_bytes("ok then caf".encode() + b"\xe9")
    yield "--calib file that is not UTF-8", (*q, "--calib", str(bad), "--out", str(work / "o3"))

    gpt2 = work / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    yield "unknown architecture (gpt2)", ("quantize", "--model", str(gpt2), "--out", str(work / "o4"))
    yield "model path that does not exist", ("quantize", "--model", str(work / "nowhere"), "--out", str(work / "o5"))
    yield "--rank larger than the hidden size (48), before loading", (*q[:-2], "--rank", "49", "--out",
                                                                      str(work / "o6"))
    yield "--method quarot with --rank 8", (*q, "--method", "quarot", "--out", str(work / "o7"))
    yield "--group-size that does not divide the columns", (*q[:-2], "--method", "quarot", "--group-size", "7",
                                                           "--out", str(work / "o8"))
    keep = work / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep")
    yield "--out is a directory that is not a checkpoint", (*q, "--out", str(keep))

    nan = work / "orig-nan"
    model = tiny_model("llama", torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    tiny_tokenizer().save_pretrained(nan)
    yield "NaN in a weight (quantize)", ("quantize", "--model", str(nan), "--calib-samples", "4", "--calib-seqlen",
                                         "16", "--rank", "8", "--out", str(work / "o9"))
    yield "--backend cpu-int8 on an original model", ("generate", str(orig), "hi", "--backend", "cpu-int8")
    yield "--tasks with an unknown task", ("eval", str(ckpt), "--tasks", "piqa,nosuchtask")
    other = work / "other-base"
    save(quantize_tiny("llama", seed=1, method="quad", rank=8, weights="rtn"), tiny_tokenizer(), other)
    ft = work / "ft.safetensors"
    code = subprocess.run([*child_argv("finetune", str(ckpt)), "--data", str(tok),
                           "--max-steps", "1", "--max-seqlen", "32", "--loss", "ce", "--adapter-only", "--out",
                           str(ft), "-q"], capture_output=True, text=True).returncode
    if code == 0:
        yield "adapter applied to another base", ("eval", str(other), "--adapter", str(ft), "--seqlen", "16",
                                                  "--max-windows", "1")
    mnt = work / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True).returncode == 0:
        yield "full disk (a 32 KB tmpfs)", (*q[:-2], "--method", "quarot", "--out", str(mnt / "ckpt"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bad_inputs.md")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quadllm-bad-") as tmp:
        work = Path(tmp)
        models = build(work)
        try:
            for name, argv in cases(work, models):
                code, line, seconds = cli(*argv, cwd=work)
                left = sorted(x.name for x in work.iterdir() if x.name.startswith(".") and "tmp" in x.name)
                rows.append((name, code, line.split(" quadllm: ", 1)[-1], seconds, left))
                print(f"{code:>3} {seconds:5.1f}s {name}: {rows[-1][2]}", flush=True)
        finally:
            subprocess.run(["umount", str(work / "small")], capture_output=True)
    r = run_python("print(open('/etc/shadow').read())\n")
    rows.append(("HumanEval sandbox: a program reads /etc/shadow", r.status, r.detail.strip().splitlines()[-1]
                 if r.detail.strip() else r.stdout, r.seconds, []))
    lines = ["# Bad inputs", "", "Generated by `python scripts/bad_inputs.py` (tiny random models; each case its own "
             "`quadllm` process; time includes Python and torch start-up).", "",
             "| case | exit code | message | seconds | left behind |", "| --- | ---: | --- | ---: | --- |"]
    for name, code, line, seconds, left in rows:
        msg = line.replace("|", "\\|").replace(str(Path(tempfile.gettempdir())), "$TMP")
        lines.append(f"| {name} | {code} | {msg} | {seconds:.1f} | {', '.join(left) or 'nothing'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
