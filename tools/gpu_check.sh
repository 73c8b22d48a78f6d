#!/usr/bin/env bash
# One call on a CUDA machine (under eight minutes): versions, the GPU tests, the copy bandwidth, every op benchmarked,
# one result folder benchmarks/results/<date>_<device>/ (copied into $OUT when set). On a CPU: --dry-run.
# What it runs and writes: tools/gpu_check.py and benchmarks/README.md ("One call on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" tools/gpu_check.py "$@"
