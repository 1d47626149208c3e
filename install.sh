#!/usr/bin/env bash
# Installs fssam-deploy and everything it needs into the current Python environment
# (activate a virtual environment first). Override the torch pin with TORCH_SPEC.
#   - torch/torchvision are pinned first, so no other torch gets pulled in;
#   - sam2 (PyPI 1.1.0) is a source package: it is built without its optional CUDA
#     extension (SAM2_BUILD_CUDA=0) against the torch just installed (--no-build-isolation);
#   - then this project, editable, with the extras named by EXTRAS (default `dev`: ONNX, OpenVINO, benchmark
#     and test extras; `serve-dev` for the serving environment, which needs numpy<2).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
EXTRAS="${EXTRAS:-dev}"
"$PY" -m pip install --upgrade pip setuptools wheel
# shellcheck disable=SC2086
"$PY" -m pip install $TORCH_SPEC
SAM2_BUILD_CUDA=0 "$PY" -m pip install --no-build-isolation "sam2==1.1.0"
"$PY" -m pip install -e ".[$EXTRAS]"
"$PY" -c "import fssam_deploy, sam2, torch; print('fssam-deploy', fssam_deploy.__version__, '| torch', torch.__version__)"
