#!/usr/bin/env bash
# GPU verification in one shot, for a short window on a lent GPU host (docs/gpu-verification.md).
#
# Run from the repository root (the device tool runs commands there), with the bundle that
# `make gpu-bundle` made carried in gpu-bundle/:
#
#   MODE=core bash benchmarks/gpu_check.sh                  # device tool: carry=["gpu-bundle"]
#   WHEELS_SHA256=<joined sha256> MODE=dali bash benchmarks/gpu_check.sh   # after the DALI parts
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_check.sh         # the whole harness, CPU-only (CI)
#
# Settings come from the environment: MODE=core|dali|cvcuda, OUT (default gpu-results/; the device
# tool's $OUT when set), DEADLINE (420 s), DRY, BUNDLE, WORK, WHEELS, WHEELS_SHA256, PY (python3):
# see benchmarks/gpu_check.py. Results: at most 6 files in OUT (summary.txt, result.json, result.md,
# junit.xml, logs.tar.gz, fuzz-findings.tar.gz); the exit status is 1 when any step failed.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PY:-python3}"
export PY
exec "$PY" -m benchmarks.gpu_check run "$@"
