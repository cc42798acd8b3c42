#!/usr/bin/env bash
# Install the formats' authors' own packages that tests/test_reference_formats.py compares our loaders
# with, into the project's venv next to the CPU torch wheel: vLLM's `speculators` (speculators EAGLE-3 /
# DFlash / DSpark) and z-lab's `dflash` (z-lab DFlash). README's test command and CI run this script.
#
# dflash 0.1.0 is pure Python but pins tqdm, datasets and requests exactly; it is installed without its
# dependencies so that it downgrades none of ours (the project already has all three).
#
# Why not the dev extra: `pip install speculators` pulls PyPI's torchvision / torchaudio, whose Linux
# builds are CUDA-linked; next to torch 2.13.0+cpu torchvision's ops fail to register
# ("operator torchvision::nms does not exist") and every `transformers` model import fails with it.
# So: speculators without its dependencies, plus the modules its model code imports at import time
# (found by importing speculators.models.{eagle3,dflash,dspark} in a venv that had only ours).
# speculators 0.9.0 declares transformers<=5.19.0; the checks were run with 5.24.0 and with 5.19.0.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -m pip install -q --no-deps "dflash==0.1.0" "speculators==0.9.0" "hs-connectors==0.9.0" "loguru==0.7.3" "openai==3.57.0" "sniffio==1.3.1"
"$PY" -c "from speculators.models.eagle3 import Eagle3DraftModel; from speculators.models.dspark import DSparkDraftModel; import dflash; print('speculators and dflash OK')"
