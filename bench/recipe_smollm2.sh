#!/usr/bin/env bash
# The self-distillation recipe on one GPU, end to end, in phases (each fits one 10-minute run):
#   distill  regenerate the ShareGPT answers with the model itself (`fastmedusa distill`, compiled, batched)
#   train    the recipe's heads: stage 2 (Medusa-2) on those answers, KL heads and the LM's cross-entropy on
#            its own answers; writes heads/, the measured tree.json and model/ (the trained backbone), and
#            makes it $WORK/best, the run the decode phases measure
#   stage1   KL heads on a frozen backbone (`train --loss kl`): the model stays exactly the original
#   decode   MT-Bench first turns at batch 1: own greedy, Medusa greedy, typical (with a profile of both
#            steps), and HF static compiled on 24 prompts
#   sampling MT-Bench first turns at batch 1, temperature 0.7: plain sampling, Medusa typical and exact acceptance
#            (exact must reproduce plain sampling; bf16 up to near-ties)
#   batched  batch 16 and 64: own greedy and Medusa greedy, with the heads' tree.json and with auto:16
#   ablation CE/KL x ShareGPT/self-distilled, 5 heads each (prefixes of 1..5 heads in ablation.json)
#   stage2   Medusa-2 on the self-distilled answers: heads and backbone together (KL heads, LM cross-entropy
#            on the model's own answers), settings in STAGE2_RUNS: conservative, strong (the measured one),
#            warm (starts from the stage1 phase's heads) and anchored (strong, LM loss = KL from a frozen copy of
#            the original: --lm-loss kl); writes model/ beside heads/
#   pick     the run whose tree.json expects the most tokens/step becomes $WORK/best (decode, batched use it)
#   shrink   $WORK/best's heads (trained with DRAFT_VOCAB=0) cut to SHRINK_VOCAB tokens by `fastmedusa
#            shrink-vocab`, then both decoded at batch 1 with a step profile: acceptance and step time, side by side
#   drift    how far a stage-2 backbone moved from the original: both answer MT-Bench greedily, each scores both
#   graphs   the decode loop's two CUDA-graph modes (compile, step) at batch 1 (profiled) and 16, same heads
#   compile  cold first calls (an empty inductor cache each) and step times at batch 1: the decoder block
#            compiled once (whole-step or torch.compile graphs) against the unrolled stack
#
#   MODEL=model.gguf DATA=sharegpt.json PROMPTS=question.jsonl WORK=runs OUT=results \
#       bash bench/recipe_smollm2.sh distill train decode
#   DRAFT_VOCAB=0 ... bash bench/recipe_smollm2.sh train    # the same heads over the full 49,152-token vocabulary
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
# The train and stage2 phases' heads score only the N most frequent label tokens (--draft-vocab; 0: the full
# vocabulary). 16,384 by default: on the H100 such heads accepted as many tokens per step as full-vocabulary
# ones (3.99 against 3.95, 4.04 against 4.03) with a cheaper verify step (1.11-1.13x a greedy step against
# 1.19-1.21x), bench/results/decode_real_heads_auto_prefill_h100 and decode_draft_heads_h100
DRAFT_VOCAB=${DRAFT_VOCAB:-16384}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" "$OUT"

train() {  # train NAME LOSS DATA NUM_HEADS [extra flags]
    local name=$1 loss=$2 data=$3 heads=$4
    shift 4
    # a run past TRAIN_SECONDS is stopped (0: no limit); its heads are then missing, and pick skips it
    timeout "${TRAIN_SECONDS:-0}" python3 -m fastmedusa train --model "$MODEL" --data "$data" --max-conversations all --stage 1 --num-heads "$heads" \
        --seq-len 1024 --pack --batch-size 16 --max-steps "$STEPS" --lr 1e-3 --eval-size "${EVAL_SIZE:-200}" \
        --eval-every "$STEPS" --log-every 100 --save-every 0 --tree-prompts "${TREE_PROMPTS:-32}" --loss "$loss" \
        --no-progress --no-plot --overwrite --output-dir "$WORK/$name" "$@" 2>&1 | tee "$OUT/train_$name.log"
    cp "$WORK/$name/heads/tree.json" "$OUT/tree_$name.json" 2>/dev/null || true
}

stage2() {  # stage2 SETTING: Medusa-2, the backbone learns too (lr), heads at lr x multiplier, LM loss kept
    local flags
    case $1 in
    conservative) flags=(--lr 5e-5 --heads-lr-multiplier 20 --heads-coefficient 0.2 --heads-decay 0.8) ;;
    strong) flags=(--lr 2e-4 --heads-lr-multiplier 5 --heads-decay 0.8) ;;
    # Medusa-2's warm start: the stage1 phase's heads, so that fresh heads' large early gradients never reach
    # the backbone (on the CPU, 10 steps from fresh heads moved the held-out LM loss 0.40 -> 0.64 even here)
    warm) flags=(--init-heads "$WORK/kl-distilled-$HEADS/heads" --lr 5e-5 --heads-lr-multiplier 20
        --heads-coefficient 0.2 --heads-decay 0.8) ;;
    # strong, with the LM loss as KL from a frozen copy of the original model (the Medusa paper's
    # self-distillation loss): the model is held to its own distribution while the heads pull on it
    anchored) flags=(--lr 2e-4 --heads-lr-multiplier 5 --heads-decay 0.8 --lm-loss kl) ;;
    *) echo "unknown stage-2 setting $1 (conservative, strong, warm, anchored)" >&2; exit 2 ;;
    esac
    TRAIN_SECONDS=${STAGE2_SECONDS:-0} train "$(stage2_name "$1")" kl "$WORK/distilled.jsonl" "$HEADS" --stage 2 \
        "${flags[@]}" --draft-vocab "$DRAFT_VOCAB"
}

stage2_name() {  # kl2-SETTING-HEADS, with -draftN for a draft vocabulary
    local name="kl2-$1-$HEADS"
    ((DRAFT_VOCAB > 0)) && name+="-draft$DRAFT_VOCAB"
    echo "$name"
}

heads_dir() {  # the heads the decode phases measure: $WORK/best (train, pick), else the stage-1 KL run
    if [[ -e $WORK/best/heads ]]; then echo "$WORK/best/heads"; else echo "$WORK/kl-distilled-$HEADS/heads"; fi
}

model_flag() {  # a stage-2 run's heads bring their own backbone (heads/config.json): pass --model only without one
    [[ -d $1/../model ]] || echo "--model $MODEL"
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
        stage2 strong
        # a link by the bare run name: it resolves inside $WORK, relative or not
        run=$(stage2_name strong)
        [[ -f $WORK/$run/heads/tree.json ]] && ln -sfn "$run" "$WORK/best"
        ;;
    stage1)
        train "kl-distilled-$HEADS" kl "$WORK/distilled.jsonl" "$HEADS"
        ;;
    decode)  # batch 1: own greedy, Medusa greedy and typical (with a step profile); HF compiled on fewer prompts
        heads=$(heads_dir)
        # shellcheck disable=SC2046
        timeout 330 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
            --batch-sizes 1 --new-tokens 256 --rows greedy medusa typical --profile \
            --out "$OUT/decode_mtbench_b1.json" 2>&1 | tee "$OUT/decode_b1.log"
        [[ ${DECODE_HF:-1} == 0 ]] && continue
        # shellcheck disable=SC2046
        timeout 200 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
            --num-prompts 24 --batch-sizes 1 --new-tokens 256 --rows greedy hf-static \
            --out "$OUT/decode_mtbench_b1_hf.json" 2>&1 | tee "$OUT/decode_b1_hf.log"
        ;;
    sampling)  # batch 1 at temperature 0.7: plain sampling, Medusa typical and exact acceptance (lossless)
        heads=$(heads_dir)
        # shellcheck disable=SC2046
        timeout 330 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
            --num-prompts 40 --batch-sizes 1 --new-tokens 256 --rows greedy sampled typical exact --temperature 0.7 \
            --out "$OUT/decode_mtbench_b1_sampling.json" 2>&1 | tee "$OUT/decode_b1_sampling.log"
        ;;
    batched)  # batch 16 and 64 with the heads' 64-node tree.json and with a 16-node tree from its accuracies
        heads=$(heads_dir)
        for tree in ${BATCHED_TREES:-default auto:16}; do
            flag=()
            [[ $tree != default ]] && flag=(--tree "$tree")
            # shellcheck disable=SC2046
            timeout 280 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
                --batch-sizes ${BATCH_SIZES:-16 64} --new-tokens 256 --rows greedy medusa "${flag[@]}" \
                --out "$OUT/decode_mtbench_batched_${tree/:/}.json" 2>&1 | tee "$OUT/decode_batched_${tree/:/}.log"
        done
        ;;
    graphs)  # the two CUDA-graph modes of the decode loop side by side: batch 1 with a step profile, batch 16
        heads=$(heads_dir)
        for mode in compile step; do
            # shellcheck disable=SC2046
            timeout 280 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
                --num-prompts 32 --batch-sizes 1 16 --new-tokens 256 --rows greedy medusa --profile --cuda-graphs "$mode" \
                --out "$OUT/decode_graphs_$mode.json" 2>&1 | tee "$OUT/decode_graphs_$mode.log"
        done
        ;;
    compile)  # cold first calls and step times: the decoder block compiled once or unrolled, both graph modes
        heads=$(heads_dir)
        for setting in "1 step" "1 compile" "0 compile"; do
            read -r regional mode <<< "$setting"
            name="regional${regional}_$mode"
            rm -rf "$WORK/inductor_$name"  # an empty inductor cache per setting: every first call compiles cold
            # shellcheck disable=SC2046
            TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_$name" FASTMEDUSA_REGIONAL_COMPILE=$regional timeout 220 \
                python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$heads" --prompts "$PROMPTS" \
                --num-prompts 8 --batch-sizes 1 --new-tokens 256 --rows greedy medusa typical --profile \
                --cuda-graphs "$mode" --out "$OUT/decode_compile_$name.json" 2>&1 | tee "$OUT/decode_compile_$name.log"
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
    stage2)  # Medusa-2 settings side by side (STAGE2_RUNS)
        for setting in ${STAGE2_RUNS:-conservative strong}; do stage2 "$setting"; done
        ;;
    shrink)  # full-vocabulary heads against the same heads cut to SHRINK_VOCAB tokens (same prompts, one call)
        heads=$(heads_dir)
        shrunk="$WORK/shrunk${SHRINK_VOCAB:-16384}"
        timeout 200 python3 -m fastmedusa shrink-vocab "$heads" --draft-vocab "${SHRINK_VOCAB:-16384}" \
            --output "$shrunk" 2>&1 | tee "$OUT/shrink.log"
        for variant in full shrunk; do
            dir=$heads
            [[ $variant == shrunk ]] && dir=$shrunk
            # the source's model flag for both: a stage-2 run's shrunk copy names that run's backbone itself
            # shellcheck disable=SC2046
            timeout 280 python3 -m fastmedusa bench decode $(model_flag "$heads") --heads "$dir" --prompts "$PROMPTS" \
                --num-prompts "${SHRINK_PROMPTS:-24}" --batch-sizes 1 --new-tokens "${SHRINK_NEW_TOKENS:-256}" \
                --rows greedy medusa --profile --out "$OUT/decode_shrink_$variant.json" 2>&1 | tee "$OUT/decode_shrink_$variant.log"
        done
        ;;
    drift)  # the stage-2 model against the original on MT-Bench first turns (bench/model_drift.py)
        timeout 300 python3 bench/model_drift.py --base "$MODEL" --tuned "$(heads_dir)" --prompts "$PROMPTS" \
            --new-tokens 128 --out "$OUT/model_drift.json" 2>&1 | tee "$OUT/model_drift.log"
        ;;
    pick)  # the measured tree.json with the most expected tokens/step
        best=$(python3 - "$WORK" <<'PY'
import json, sys
from pathlib import Path
trees = [t for t in Path(sys.argv[1]).glob("*/heads/tree.json") if t.parent.parent.name != "best"]
runs = [(json.loads(t.read_text())["expected_tokens_per_step"], t.parent.parent.name) for t in trees]
for expected, run in sorted(runs):
    print(f"{run}: expected {expected:.3f} tokens/step", file=sys.stderr)
print(max(runs)[1] if runs else "")
PY
)
        [[ -n $best ]] && ln -sfn "$best" "$WORK/best" && echo "best: $best" | tee "$OUT/best.txt"  # bare name
        ;;
    *)
        echo "unknown phase $phase (distill, train, stage1, stage2, pick, shrink, drift, decode, sampling, batched, graphs, compile, ablation)" >&2
        exit 2
        ;;
    esac
done
echo "== done $(date -u +%H:%M:%S)"
