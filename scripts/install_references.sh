#!/usr/bin/env bash
# Install vLLM's `speculators` (the reference for the speculators EAGLE-3 / DFlash / DSpark formats,
# tests/test_reference_formats.py) into the project's venv, next to the CPU torch wheel.
#
# Why not the dev extra: `pip install speculators` pulls PyPI's torchvision / torchaudio, whose Linux
# builds are CUDA-linked; next to torch 2.13.0+cpu torchvision's ops fail to register
# ("operator torchvision::nms does not exist") and every `transformers` model import fails with it.
# So: speculators without its dependencies, plus the modules its model code imports at import time
# (found by importing speculators.models.{eagle3,dflash,dspark} in a venv that had only ours).
# speculators 0.9.0 declares transformers<=5.19.0; the checks were run with 5.24.0 and with 5.19.0.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -m pip install --no-deps "speculators==0.9.0" "hs-connectors==0.9.0" "loguru==0.7.3" "openai==3.57.0" "sniffio==1.3.1"
"$PY" -c "from speculators.models.eagle3 import Eagle3DraftModel; from speculators.models.dspark import DSparkDraftModel; print('speculators OK')"
