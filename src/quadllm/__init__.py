"""quadllm: W4A4 quantization of LLMs with QUAD (Quantization with Activation Decomposition).

Python API (mirrors the CLI)::

    import quadllm
    model, tok, source = quadllm.load_model()            # SmolLM2-135M-Instruct offline by default
    cfg = quadllm.QuantConfig(method="quad", rank=64, mode="w4a4")
    samples = quadllm.calibration_samples(tok, cfg)      # from cfg.calib (or the embedded default)
    quadllm.quantize(model, cfg, samples)
    quadllm.save(model, tok, "smol-quad", original=source)
    qmodel, tok, meta = quadllm.load("smol-quad")
    quadllm.place(qmodel, "cpu-int8")                    # optional: INT8 GEMMs instead of the simulation
    reference, _, _ = quadllm.load_model(meta["original_model"]["spec"])
    print(quadllm.evaluate(qmodel, tok, data="wikitext2", reference=reference))

The layout (``DEVELOPERS.md`` has the map): ``core`` (pure math), ``arch`` (one adapter per model
family), ``nn`` (the QUAD modules), ``steps`` (transforms, calibration, weight quantization),
``pipelines`` (the per-layer recipe; in memory, streaming, loading), ``io`` (checkpoints, model
sources, storage), ``backends``, ``data``, ``evaluation``, ``finetune``, ``analysis``, ``cli``.
"""

from .backends import place
from .config import ConfigError, QuantConfig
from .data.samples import calibration_samples
from .errors import QuadllmError
from .evaluation.perplexity import evaluate
from .integrations.hf import register as register_with_transformers
from .io.checkpoint import CheckpointError, save
from .io.sources import ModelSource, load_model
from .pipelines.convert import convert
from .pipelines.in_memory import quantize
from .pipelines.loading import load
from .version import __version__

register_with_transformers()  # AutoModelForCausalLM.from_pretrained loads quadllm checkpoints once quadllm is imported

__all__ = ["QuantConfig", "ConfigError", "QuadllmError", "quantize", "load_model", "ModelSource", "save", "load",
           "place", "CheckpointError", "evaluate", "calibration_samples", "convert", "register_with_transformers",
           "__version__"]
