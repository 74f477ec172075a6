#!/usr/bin/env bash
# The self-distillation recipe on one GPU, end to end, in phases (each fits one 10-minute run):
#   distill  regenerate the ShareGPT answers with the model itself (`fastmedusa distill`, compiled, batched)
#   train    KL heads on those answers (`train --loss kl`); writes heads/ and the measured tree.json
#   decode   MT-Bench first turns at batch 1: own greedy, Medusa greedy, typical (with a profile of both
#            steps), and HF static compiled on 24 prompts
#   batched  batch 16 and 64: own greedy and Medusa greedy, with the heads' tree.json and with auto:16
#   ablation CE/KL x ShareGPT/self-distilled, 5 heads each (prefixes of 1..5 heads in ablation.json)
#
#   MODEL=model.gguf DATA=sharegpt.json PROMPTS=question.jsonl WORK=runs OUT=results \
#       bash bench/recipe_smollm2.sh distill train decode
# Every phase reuses what an earlier one wrote under $WORK. Logs and JSON go to $OUT.
set -uo pipefail
MODEL=${MODEL:-/root/stage/model.gguf}
DATA=${DATA:-/root/stage/sharegpt_subset.json}
PROMPTS=${PROMPTS:-/root/stage/mt_bench_question.jsonl}
WORK=${WORK:-/root/stage/work}
OUT=${OUT:-bench/results/recipe}
HEADS=${HEADS:-4}
STEPS=${STEPS:-600}
DISTILL_SECONDS=${DISTILL_SECONDS:-300}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" "$OUT"
fm() { python3 -m fastmedusa "$@"; }

train() {  # train NAME LOSS DATA NUM_HEADS [extra flags]
    local name=$1 loss=$2 data=$3 heads=$4
    shift 4
    fm train --model "$MODEL" --data "$data" --max-conversations all --stage 1 --num-heads "$heads" \
        --seq-len 1024 --pack --batch-size 16 --max-steps "$STEPS" --lr 1e-3 --eval-size 200 \
        --eval-every "$STEPS" --log-every 100 --save-every 0 --tree-prompts 32 --loss "$loss" \
        --no-progress --no-plot --overwrite --output-dir "$WORK/$name" "$@" 2>&1 | tee "$OUT/train_$name.log"
    cp "$WORK/$name/heads/tree.json" "$OUT/tree_$name.json" 2>/dev/null || true
}

for phase in "$@"; do
    echo "== $phase $(date -u +%H:%M:%S)"
    case $phase in
    distill)
        # a group of 16 x batch conversations is written at once: a timeout keeps every finished group
        timeout "$DISTILL_SECONDS" python3 -m fastmedusa distill --model "$MODEL" --data "$DATA" \
            --output "$WORK/distilled.jsonl" --max-conversations all --max-turns 2 --batch-size 64 \
            --max-new-tokens 256 --resume --no-progress 2>&1 | tee "$OUT/distill.log"
        gzip -c "$WORK/distilled.jsonl" > "$OUT/distilled.jsonl.gz"
        ;;
    train)
        train "kl-distilled-$HEADS" kl "$WORK/distilled.jsonl" "$HEADS"
        ;;
    decode)  # batch 1: own greedy, Medusa greedy and typical (with a step profile); HF compiled on fewer prompts
        heads="$WORK/kl-distilled-$HEADS/heads"
        timeout 330 python3 -m fastmedusa bench decode --model "$MODEL" --heads "$heads" --prompts "$PROMPTS" \
            --batch-sizes 1 --new-tokens 256 --rows greedy medusa typical --profile \
            --out "$OUT/decode_mtbench_b1.json" 2>&1 | tee "$OUT/decode_b1.log"
        timeout 200 python3 -m fastmedusa bench decode --model "$MODEL" --heads "$heads" --prompts "$PROMPTS" \
            --num-prompts 24 --batch-sizes 1 --new-tokens 256 --rows greedy hf-static \
            --out "$OUT/decode_mtbench_b1_hf.json" 2>&1 | tee "$OUT/decode_b1_hf.log"
        ;;
    batched)  # batch 16 and 64 with the heads' 64-node tree.json and with a 16-node tree from its accuracies
        heads="$WORK/kl-distilled-$HEADS/heads"
        for tree in default auto:16; do
            flag=()
            [[ $tree != default ]] && flag=(--tree "$tree")
            timeout 280 python3 -m fastmedusa bench decode --model "$MODEL" --heads "$heads" --prompts "$PROMPTS" \
                --batch-sizes 16 64 --new-tokens 256 --rows greedy medusa "${flag[@]}" \
                --out "$OUT/decode_mtbench_batched_${tree/:/}.json" 2>&1 | tee "$OUT/decode_batched_${tree/:/}.log"
        done
        ;;
    ablation)
        for run in ${RUNS:-ce-sharegpt kl-sharegpt ce-distilled kl-distilled}; do
            loss=${run%%-*}
            data=$DATA
            [[ $run == *distilled ]] && data="$WORK/distilled.jsonl"
            train "$run-5" "$loss" "$data" 5
        done
        ;;
    *)
        echo "unknown phase $phase (distill, train, decode, batched, ablation)" >&2
        exit 2
        ;;
    esac
done
echo "== done $(date -u +%H:%M:%S)"
