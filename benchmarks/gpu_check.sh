#!/usr/bin/env bash
# Every GPU check of this project in one run, for a session that is lent a GPU machine.
#
# Run it on the GPU machine from the repository root, after the optional wheels were installed
# into /tmp/site (see docs/gpu-verification.md, "Running the GPU checks"). Each step writes its
# own log under $OUT (the device tool returns that folder); a failing step does not stop the
# others. Then copy the figures into docs/gpu-verification.md and docs/benchmarks.md.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh [quick]
#
# `quick` runs the tests and a short throughput table only (about 3 minutes on an H100).
set -u
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
step() {  # step NAME COMMAND...: run, log, record the exit status
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local started=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

date -u +"%Y-%m-%dT%H:%MZ" > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
for module in nvidia.dali cvcuda nvidia.nvimgcodec torch_tensorrt tensorrt ts skimage; do
    $PY -c "import $module as m; print('$module', getattr(m, '__version__', '?'))" >> "$OUT/gpu.txt" 2>&1 \
        || echo "$module: not importable" >> "$OUT/gpu.txt"
done

step tests-gpu $PY -m pytest -q -rs -s -m gpu tests/unit
# Issue 11: the pipeline's streams and the decode processes next to a GPU worker.
step tests-gpu-pipeline $PY -m pytest -q -rs -s tests/unit/test_pipeline.py tests/unit/test_decode_pool.py
# The GPU halves of the issue-14 fixes and the geometry modes, named so a failure is easy to find.
step tests-gpu-defects $PY -m pytest -q -rs -s \
    tests/unit/test_gpu_path_defects.py::test_dali_copy_is_complete_before_the_next_run_on_gpu \
    tests/unit/test_gpu_path_defects.py::test_cpu_upload_on_gpu_is_from_pinned_memory \
    "tests/unit/test_geometry.py::test_accelerated_backends_meet_the_contract_in_every_mode" \
    tests/unit/test_preprocess_backends.py::test_gpu_backend_runs_on_the_current_stream
if [ "${1:-}" = quick ]; then
    step preprocess-cuda $PY benchmarks/preprocess.py --device cuda --sizes 1080p --batches 8 64 --seconds 1
    exit 0
fi
step tests-preprocess $PY -m pytest -q -rs -s tests/unit/test_preprocess_backends.py tests/unit/test_fuzz_corpus.py
step preprocess-cuda $PY benchmarks/preprocess.py --device cuda --batches 1 8 32 64 --seconds 2
for backend in torchvision dali cvcuda; do
    step "memory-$backend" $PY benchmarks/preprocess_memory.py --backend "$backend" --device cuda --requests 10000
done
step backbones-cuda $PY benchmarks/backbones.py --device cuda --batches 1 8 32 --precision fp16 \
    --backends aoti tensorrt --cache-dir /tmp/tsgpu-cache
step fuzz-gpu $PY fuzz/fuzz_decode.py --seconds 120 --device cuda
cat "$OUT/summary.txt"
