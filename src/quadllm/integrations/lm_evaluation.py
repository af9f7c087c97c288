"""quadllm checkpoints in lm-evaluation-harness's own command line.

Two ways in, both scoring with the harness's unchanged ``HFLM`` (its requests, batching and metrics):

- ``lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True`` on a checkpoint in the
  stock layout: transformers loads it through the checkpoint's ``auto_map`` shim
  (:mod:`quadllm.integrations.hf`);
- ``quadllm lm-eval --model quadllm --model_args pretrained=CKPT[,backend=cpu-int8][,adapter=FILE]``
  (also ``quadllm-lm-eval``): the harness's command line with the ``quadllm`` model type
  (:class:`QuadllmLM`) registered, which loads any quadllm checkpoint with :func:`quadllm.load`
  (both layouts, fine-tuning adapters, every backend). Offline, it points ``--include_path`` at
  quadllm's offline task configurations unless the command names one.

The ``lm_eval.models`` entry point in ``pyproject.toml`` names :class:`QuadllmLM` for harness
releases that discover model types from installed packages.
"""

from __future__ import annotations

import logging
import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..backends import DTYPES, place
from ..config import ConfigError
from ..evaluation.tasks.harness import OFFLINE_DIR, is_offline, softmax_dtype
from ..pipelines.loading import load

log = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "QuadllmLM", "harness_argv", "main"]

#: the model type ``--model`` names
MODEL_NAME = "quadllm"

@register_model(MODEL_NAME)
class QuadllmLM(HFLM):
    """The harness's ``HFLM`` around :func:`quadllm.load` (``pretrained``: a quadllm checkpoint).

    ``backend``: where the quantized linears run (:func:`quadllm.place`: ``fake``, ``cpu-int8``,
    ``gpu``, ``auto``); ``dtype``: ``float32`` or ``bfloat16`` (the fake backend only);
    ``adapter``: a fine-tuning adapter file trained on this checkpoint. The other arguments are
    ``HFLM``'s (``batch_size``, ``max_length``, ...)."""

    def __init__(self, pretrained: str, backend: str = "fake", dtype: str = "float32",
                 adapter: str | None = None, **kwargs) -> None:
        if not isinstance(pretrained, str):
            raise ConfigError(f"--model {MODEL_NAME} takes a checkpoint directory as pretrained=, got "
                              f"{type(pretrained).__name__}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        for ignored in ("trust_remote_code", "device", "parallelize"):
            if kwargs.pop(ignored, None) not in (None, False, "cpu"):
                log.warning("%s is ignored by --model %s (the backend decides the device)", ignored, MODEL_NAME)
        model, tokenizer, _ = load(pretrained, dtype=DTYPES[dtype], adapter=adapter)
        placed = place(model, backend)
        log.info("%s on %s", pretrained, placed)
        super().__init__(pretrained=model, tokenizer=tokenizer, softmax_dtype=softmax_dtype(model), **kwargs)


def harness_argv(argv: list[str], offline: bool | None = None) -> list[str]:
    """``argv`` for the harness's command line: offline (:func:`is_offline`), quadllm's offline task
    configurations join unless ``argv`` names its own ``--include_path``."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return list(argv)
    return [*argv, "--include_path", str(OFFLINE_DIR)] if is_offline(offline) else list(argv)


def main(argv: list[str] | None = None) -> int:
    """``quadllm lm-eval ARGS`` / ``quadllm-lm-eval ARGS``: ``lm_eval ARGS`` with ``--model quadllm``."""
    from lm_eval.__main__ import cli_evaluate

    args = harness_argv(list(sys.argv[1:] if argv is None else argv))
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
