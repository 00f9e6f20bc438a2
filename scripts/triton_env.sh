#!/usr/bin/env bash
# A separate environment for the real-Triton check (tests/test_serving_triton.py): the nvidia-pytriton wheel ships a
# tritonserver binary with the Python backend that runs on the CPU; it and tritonclient are pinned in the `triton` extra, with numpy < 2
# (what that wheel's Python stub is built against), so it lives apart from the project's venv.
# Usage: scripts/triton_env.sh [VENV_DIR]   (default .venv-triton); then export RTSD_TRITON_PYTHON=VENV_DIR/bin/python
set -euo pipefail
venv="${1:-.venv-triton}"
root="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "numpy<2" -e "$root[onnx,triton]"
echo "export RTSD_TRITON_PYTHON=$venv/bin/python"
