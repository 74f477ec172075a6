#!/usr/bin/env bash
# The test suite on the CPU (Triton kernels run in the interpreter): set-up, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
