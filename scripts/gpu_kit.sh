#!/usr/bin/env bash
# Build .devkit/ (git-ignored) for the GPU checks of scripts/gpu_checks.sh on a lent device machine, whose image
# has PyTorch, Lightning, torchvision, torchmetrics and scikit-learn but not diffusers, Hydra, OmegaConf or
# torch-fidelity, and which reaches no network. Run here, in the repository root, with the data beside it:
#   bash scripts/gpu_kit.sh [DDPM_CKPT]      # DDPM_CKPT: a quick DDPM checkpoint for the `nfe` check (optional)
# Writes (about 45 MB; a device call carries at most 64 MiB with the repository, so each check carries only its part):
#   .devkit/whl/    wheels of the missing pure-Python packages (the versions of pyproject's pins that this
#                   project was tested with; the device's huggingface-hub and safetensors satisfy diffusers)
#   .devkit/mnist/  MNIST/raw/*.gz (unpacked there)          .devkit/art/  the painting folders
#   .devkit/ckpt/   DDPM_CKPT as ddpm.ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${ATELIER_DATA_DIR:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
KIT=.devkit
mkdir -p $KIT/whl $KIT/mnist/MNIST/raw $KIT/ckpt
# pure-Python wheels for CPython 3.12 (the device's python3); antlr4 4.9.3 exists only as an sdist: build its wheel
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d $KIT/whl \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 torch-fidelity==0.4.0 importlib-metadata==8.7.0 zipp==3.23.0 ema-pytorch==0.8.3
$PY -m pip wheel -q --no-deps -w $KIT/whl antlr4-python3-runtime==4.9.3
cp "$DATA"/MNIST/raw/*.gz $KIT/mnist/MNIST/raw/
rm -rf $KIT/art && cp -r "$DATA"/art $KIT/art
if [ $# -ge 1 ]; then cp "$1" $KIT/ckpt/ddpm.ckpt; fi
du -sh $KIT/* | sed 's/^/kit: /'
