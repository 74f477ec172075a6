#!/usr/bin/env bash
# Real-client check: FasterDecoding/Medusa's own MedusaModel.from_pretrained (PyPI medusa-llm) loads heads that
# `fastmedusa export --legacy-pt` wrote, and its heads give our logits. Runs on the CPU.
#
#   bash bench/interop_fasterdecoding.sh [WORK_DIR [RESULT_JSON]]
#     (defaults: /tmp/fastmedusa-interop-vllm, whose base model and fresh heads bench/interop_vllm.sh made;
#      bench/results/interop_fasterdecoding.json)
#
# Environment: PYTHON (fastmedusa's Python, default python3), MEDUSA_PYTHON (a virtualenv with medusa-llm,
# default /tmp/medusa-venv/bin/python). Exit status: 0 OK, 1 mismatch, 3 medusa-llm not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/fastmedusa-interop-vllm}
RESULT=${2:-bench/results/interop_fasterdecoding.json}
PYTHON=${PYTHON:-python3}
MEDUSA_PYTHON=${MEDUSA_PYTHON:-/tmp/medusa-venv/bin/python}

if ! "$MEDUSA_PYTHON" -c "import medusa.model.medusa_model" >/dev/null 2>&1; then
  cat >&2 <<'MSG'
medusa-llm is not importable. Install it in its own virtualenv (its model code wants transformers 4.x):
  python3 -m venv /tmp/medusa-venv
  /tmp/medusa-venv/bin/pip install torch==2.13.0 transformers==4.46.3 "accelerate<1" safetensors sentencepiece protobuf
  /tmp/medusa-venv/bin/pip install --no-deps medusa-llm
MSG
  exit 3
fi
if [[ ! -d "$WORK/heads" ]]; then
  echo "no heads in $WORK/heads: run bash bench/interop_vllm.sh $WORK first (it makes the base model and heads)" >&2
  exit 3
fi
PYTHONPATH=src "$PYTHON" bench/interop_fasterdecoding.py prepare --heads "$WORK/heads" --out "$WORK/fasterdecoding"
"$MEDUSA_PYTHON" bench/interop_fasterdecoding.py check --heads "$WORK/fasterdecoding/heads_pt" \
  --probe "$WORK/fasterdecoding/probe.safetensors" --result "$RESULT" 2> >(grep -v -E "Warning|warn|inv_freq|TRAIN this" >&2)
