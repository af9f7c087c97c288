"""quadllm: W4A4 quantization of LLMs with QUAD (Quantization with Activation Decomposition).

Python API (mirrors the CLI)::

    import quadllm
    model, tok, source = quadllm.load_model()            # SmolLM2-135M-Instruct offline by default
    cfg = quadllm.QuantConfig(method="quad", rank=64, mode="w4a4")
    samples = quadllm.calibration_samples(tok, cfg)      # from cfg.calib (or the embedded default)
    quadllm.quantize(model, cfg, samples)
    quadllm.save(model, tok, "smol-quad", original=source)
    qmodel, tok, meta = quadllm.load("smol-quad")
    print(quadllm.evaluate(qmodel, tok, data="wikitext2", reference=True, meta=meta))
"""

__version__ = "0.1.0"

from .config import ConfigError, QuantConfig  # noqa: E402
from .pipeline import quantize  # noqa: E402
from .models import load_model, ModelSource  # noqa: E402
from .checkpoint import CheckpointError, load, save  # noqa: E402
from .api import evaluate  # noqa: E402
from .api import calibration_samples  # noqa: E402

__all__ = ["QuantConfig", "ConfigError", "quantize", "load_model", "ModelSource", "save", "load",
           "CheckpointError", "evaluate", "calibration_samples", "__version__"]
