#!/usr/bin/env bash
# The GPU check (see bench/gpu/check.py): CUDA equivalence at bf16, then onepass vs TRL on one GPU.
#   bash bench/gpu/check.sh            on a CUDA machine (PYTHON=... picks the interpreter)
#   bash bench/gpu/check.sh --dry-run  the plumbing on the CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"  # onepass from this checkout, installed or not
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" bench/gpu/check.py "$@"
