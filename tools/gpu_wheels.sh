#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels moe-forge needs that the lent GPU machine's
# image does not hold, into .whl/ (git-ignored). tools/gpu_session.sh installs them there.
#   bash tools/gpu_wheels.sh
# The image has torch, triton, pytorch-lightning, transformers, safetensors, tokenizers, numpy,
# matplotlib, tqdm, pytest and hypothesis; it lacks omegaconf (and its antlr4 runtime), and
# datasets (imported only for hub and parquet sources) with dill and multiprocess. Its Python is
# 3.12, so the wheels are chosen for 3.12 whatever Python runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
ls -1 .whl
