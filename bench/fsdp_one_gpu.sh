#!/usr/bin/env bash
# The FSDP2 training path at world size 1 on one GPU, Llama-3.2-1B shape (random weights), real ShareGPT rows:
# the issue-6 row of the training benchmark. Needs .gpu/c (tokenizer + ShareGPT subset, see ../shared/GPU.md)
# carried to the GPU machine. Usage: bash bench/fsdp_one_gpu.sh OUT_DIR [extra fastmedusa train flags]
set -euo pipefail
out=${1:?output dir}; shift
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
work=/tmp/fsdp1b; mkdir -p "$work" "$out"
gunzip -c .gpu/c/sharegpt_subset.json.gz > "$work/data.json"
[ -f "$work/model/config.json" ] || python3 - "$work/model" <<'PY'
import sys, torch
from transformers import AutoTokenizer
from fastmedusa.bench.train import build_random_llama
model = build_random_llama("1b", torch.device("cuda"), torch.bfloat16)
model.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(".gpu/c/tok").save_pretrained(sys.argv[1])
PY
python3 -m torch.distributed.run --nproc-per-node 1 -m fastmedusa train --model "$work/model" --data "$work/data.json" \
  --fsdp --max-conversations 1000 --eval-size 0 --seq-len 2048 --pack --batch-size 6 --max-steps 12 --log-every 4 \
  --save-every 0 --no-progress --no-plot --param-dtype bf16 --output-dir "$work/run_$(basename "$out")" "$@"
cp "$work/run_$(basename "$out")/metrics.jsonl" "$out/"
