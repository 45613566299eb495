#!/usr/bin/env bash
# The prepared run for a lent GPU machine: every check that needs CUDA, in one command that fits
# one device call (about 9 minutes at most; each step has its own time limit, and a step that
# fails or runs out does not stop the next). Results go to $OUT (the device tool fetches them):
#   env.txt          GPU, driver, torch / triton / transformers versions
#   pytest_gpu.txt   python -m pytest -m gpu (the Triton kernels against their references)
#   kernels.txt      tools/bench_kernels.py: Mixtral and OLMoE shapes, bf16, against a dense floor
#   pretrained.txt   tools/bench_pretrained.py --device cuda --dtype bf16 (+ pretrained.json)
#   train.txt        tools/bench_train.py --device cuda --dtype bfloat16 (joint MoE vs dense)
# Here first: bash tools/gpu_wheels.sh (omegaconf and friends, as wheels into .whl/). Then, with
# the device tool: run(command="bash tools/gpu_session.sh", carry=[".whl"], timeout_s=600).
# Record what it measured in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
WHEELS=${MOE_GPU_WHEELS:-.whl}
export PYTHONUNBUFFERED=1
PY=python3

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || { echo "installing $WHEELS/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# moe (the repository root) and moe_kernels (kernels/moe_kernels) importable without a build:
# no index is reachable
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import moe.config, moe_kernels" || {
    echo "moe does not import: run tools/gpu_wheels.sh here and carry .whl"; exit 1; }
if [ -z "${MOE_GPU_SESSION_ANYWHERE:-}" ]; then  # set by its test, to run it without a GPU
    $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
        echo "no CUDA device here: this script is for the lent GPU machine"; exit 1; }
fi
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step pytest_gpu 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests
step kernels 170 $PY tools/bench_kernels.py --device cuda --dtype bfloat16
step pretrained 90 $PY tools/bench_pretrained.py --device cuda --dtype bf16 --steps 7 \
    --json "$OUT/pretrained.json"
step train 60 $PY tools/bench_train.py --device cuda --dtype bfloat16 --size small
exit 0
