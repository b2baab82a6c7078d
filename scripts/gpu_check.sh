#!/usr/bin/env bash
# The GPU check in one command (at most 8 minutes on one H100/H200): the CUDA tests, then the speed of
# PyConvResNet-50 vs ResNet-50 (bf16, channels_last and NCHW, naive vs auto plans, train and inference),
# PyConvResNet3D-50 vs ResNet3D-50, PyConvInception vs Inception-ResNet-v2, and the input pipelines.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# It runs on the machine's own PyTorch (the workbook's pinned torch cannot travel there): the workbook is
# put on PYTHONPATH, and Python packages the machine lacks (pycocotools, av, papermill, ...) are installed
# from wheels in .whl/ if that folder exists (pip download --only-binary=:all: --python-version 3.12 ...).
# OUTDIR receives summary.md (every table), cuda_tests.log and one JSON record per bench.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYCONV_PROGRESS=0
summary=$out/summary.md
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$summary"

step() {  # step SECONDS TITLE COMMAND...: run with a time limit, its output appended to the summary
    local limit=$1 title=$2
    shift 2
    echo -e "\n## $title\n\n\`$*\`\n" >> "$summary"
    timeout "$limit" "$@" 2>&1 | tail -n 40 >> "$summary"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || echo -e "\n(exit status $status$([ "$status" = 124 ] && echo ": over ${limit} s"))" >> "$summary"
}

bench="python3 -m pyconv_core.bench --out-dir $out --repeats 5"
step 140 "CUDA tests" python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --junitxml="$out/cuda_tests.xml"
step 75 "PyConvResNet-50 / ResNet-50, bf16, channels_last" $bench --models pyconvresnet50 \
    --baseline resnet50 --pyconv-plan naive auto --batch 128 --amp bf16 --channels-last --name r50-bf16-cl
step 65 "PyConvResNet-50 / ResNet-50, bf16, NCHW" $bench --models pyconvresnet50 \
    --baseline resnet50 --pyconv-plan naive auto --batch 128 --amp bf16 --name r50-bf16-nchw
step 50 "PyConvResNet3D-50 / ResNet3D-50, bf16, channels_last_3d, 16x224x224 clips" $bench \
    --models pyconvresnet3d50 --baseline resnet3d50 --pyconv-plan auto --batch 8 --frames 16 \
    --amp bf16 --channels-last --name r3d50-bf16-cl
step 40 "PyConvInception / Inception-ResNet-v2, bf16, channels_last, 299x299" $bench \
    --models pyconvinception --baseline inception_resnet_v2 --pyconv-plan auto --batch 64 \
    --size 299 --amp bf16 --channels-last --name inception-bf16-cl
step 90 "Input pipelines at the paper's sizes (items/s)" python3 -m pyconv_core.bench --out-dir "$out" \
    --loader classification detection segmentation video --workers 1 8 --seconds 4 --batch 32 --loader-items 32 \
    --name loaders
echo "summary: $summary"
