#!/usr/bin/env bash
# The main job on the embedded defaults: set-up, then train 3 Medusa heads (stage 1) on SmolLM2-135M-Instruct
# with ShareGPT conversations, CPU-sized; prints per-head top-1/top-5 accuracy on held-out conversations
# before and after training. Extra arguments go to `fastmedusa train` (see `fastmedusa train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/fastmedusa train --output-dir runs/demo "$@"
