#!/usr/bin/env bash
# Rebuild the shipped demo model (src/internvl_mpo/demo_model) from nothing, with the project's CLI only:
#
#   0. synthetic shapes VQA data, its tokenizer and the tiny config   internvl-mpo demo-data
#   1. SFT from random weights                                        internvl-mpo train sft --init-from-config
#   2. preference pairs from the SFT model's own samples              internvl-mpo pairs correctness / dropout-ntp
#   3. MPO from the SFT model (which is also the reference model)     internvl-mpo train mpo
#   4. held-out test accuracy after SFT and after MPO                 internvl-mpo eval --cot
#
# Sized for a 2-core CPU: 56 minutes end to end on 2026-12-02 (data 1.6, SFT 27.8 at 0.83 s a step,
# each evaluation 3.8, pairs 4.7, MPO 14.5 at 1.5 s a step); that run made the shipped checkpoint, and
# src/internvl_mpo/demo_model/README.md has its results. Usage:
#
#   scripts/train_demo.sh [RUN_DIR]          # default RUN_DIR: runs/demo
#   INSTALL=1 scripts/train_demo.sh          # install the better stage (MPO only if it wins, p < 0.05) as the demo model
#
# Every step is resumable or skipped when its output exists, so an interrupted run can be restarted; the
# settings below (SEED, SFT_STEPS, BARE_COPIES, PAIR_ITEMS) are kept in RUN_DIR/settings.txt, and a rerun with
# others is refused (use another RUN_DIR).
set -euo pipefail

RUN=${1:-runs/demo}
DATA=$RUN/data
SEED=${SEED:-0}
DEVICE=${DEVICE:-cpu}
SFT_STEPS=${SFT_STEPS:-2000}
BARE_COPIES=${BARE_COPIES:-0.5}
PAIR_ITEMS=${PAIR_ITEMS:-1000}
DEST=src/internvl_mpo/demo_model  # where INSTALL=1 puts the chosen stage
if [ "${INSTALL:-0}" = 1 ] && [ ! -d "$DEST" ]; then  # found now, not after the hour of training
  echo "train_demo.sh: error: INSTALL=1 installs into $DEST, which is not in $PWD; run it from the repository's root" >&2
  exit 1
fi
mkdir -p "$RUN"
# a rerun skips the steps whose outputs exist: with other settings it would report the earlier run's table
SETTINGS="SEED=$SEED SFT_STEPS=$SFT_STEPS BARE_COPIES=$BARE_COPIES PAIR_ITEMS=$PAIR_ITEMS"
if [ ! -f "$RUN/settings.txt" ]; then
  echo "$SETTINGS" > "$RUN/settings.txt"
elif [ "$(cat "$RUN/settings.txt")" != "$SETTINGS" ]; then
  echo "train_demo.sh: error: $RUN was run with $(cat "$RUN/settings.txt"), not $SETTINGS;" \
    "give another RUN_DIR, or its settings to resume it" >&2
  exit 1
fi
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUN/times.log"; }
stamp() { date +%s; }
T0=$(stamp)

# 0. data: 16000 train / 300 val / 4000 test items, one 448x448 picture each; tokenizer/ and config.json.
#    The SFT file holds every item's reasoning answer plus, for half of the items, a second copy that
#    answers with the final line only, so SFT ends on a model that leaves MPO room to gain (see the
#    demo model's README: with reasoning answers only, or 3000 SFT steps, MPO does not beat SFT)
if [ ! -f "$DATA/config.json" ]; then
  internvl-mpo demo-data "$DATA" --train 16000 --val 300 --test 4000 --seed "$SEED" --bare-copies "$BARE_COPIES"
fi
log "data ready ($(( $(stamp) - T0 ))s)"

# 1. SFT from scratch on the conversations (half of the prompts CoT-wrapped); lr and betas suit a tiny model
T=$(stamp)
if [ ! -f "$RUN/sft/final/config.json" ]; then
  internvl-mpo train sft --data "$DATA/train_sft.jsonl" --init-from-config "$DATA/config.json" \
    --tokenizer "$DATA/tokenizer" --output "$RUN/sft" --device "$DEVICE" --seed "$SEED" \
    --max-steps "$SFT_STEPS" --batch-size 8 --lr 2e-3 --adam-beta2 0.95 --weight-decay 0 \
    --drop-path-rate 0 --no-grad-checkpointing --save-every 400 --resume --no-progress
fi
log "SFT done ($(( $(stamp) - T ))s)"

evaluate() {  # evaluate MODEL NAME: greedy CoT answers on the held-out test split
  internvl-mpo eval --model "$1" --data "$DATA/test.jsonl" --cot --output "$RUN/eval_$2" --device "$DEVICE" \
    --max-num 1 --batch-size 32 --max-new-tokens 160
}
T=$(stamp)
evaluate "$RUN/sft/final" sft
log "SFT eval done ($(( $(stamp) - T ))s)"

# 2. preference pairs on training questions the SFT model answers itself (MMPR's correctness
#    pipeline: 8 samples at temperature 0.7, right vs wrong final answers) plus DropoutNTP pairs
#    (the reference answer vs the model's continuation of its first half without the image)
T=$(stamp)
# (item files live beside the images: relative image paths resolve against the file's folder)
head -n "$PAIR_ITEMS" "$DATA/train.jsonl" > "$DATA/pair_items.jsonl"
internvl-mpo pairs correctness --model "$RUN/sft/final" --input "$DATA/pair_items.jsonl" \
  --output "$RUN/pairs_correctness" --samples 8 --max-pairs 3 --temperature 0.7 --max-new-tokens 160 \
  --max-num 1 --batch-size 64 --seed "$SEED" --device "$DEVICE"
head -n 300 "$DATA/pair_items.jsonl" > "$DATA/ntp_items.jsonl"
internvl-mpo pairs dropout-ntp --model "$RUN/sft/final" --input "$DATA/ntp_items.jsonl" \
  --output "$RUN/pairs_dropout_ntp" --temperature 0.7 --max-new-tokens 160 --batch-size 64 \
  --seed "$SEED" --device "$DEVICE"
python - "$RUN" <<'EOF'
import sys
from internvl_mpo.train.mmpr import load_meta, write_meta

run = sys.argv[1]
specs = [s for name in ("pairs_correctness", "pairs_dropout_ntp") for s in load_meta(f"{run}/{name}/meta.json")]
write_meta(f"{run}/mpo_meta.json", specs)
print("MPO data:", ", ".join(f"{s.name} ({s.length} pairs)" for s in specs))
EOF
log "pairs done ($(( $(stamp) - T ))s)"

# 3. MPO: 0.8 sigmoid DPO + 0.2 BCO-pair + 1.0 SFT on the chosen answers, one epoch, beta 1.0, lr 5e-5
T=$(stamp)
if [ ! -f "$RUN/mpo/final/config.json" ]; then
  internvl-mpo train mpo --model "$RUN/sft/final" --data "$RUN/mpo_meta.json" --output "$RUN/mpo" \
    --device "$DEVICE" --seed "$SEED" --epochs 1 --batch-size 8 --lr 5e-5 --beta 1.0 --adam-beta2 0.95 \
    --weight-decay 0 --drop-path-rate 0 --no-grad-checkpointing --save-every 100 --resume --no-progress
fi
log "MPO done ($(( $(stamp) - T ))s)"
T=$(stamp)
evaluate "$RUN/mpo/final" mpo
log "MPO eval done ($(( $(stamp) - T ))s)"

# 4. the table
python - "$RUN" <<'EOF' | tee "$RUN/results.md"
import json
import math
import sys

run = sys.argv[1]
scores = {name: json.load(open(f"{run}/eval_{name}/score.json")) for name in ("sft", "mpo")}
rows = {name: {r["id"]: r["correct"] is True for r in map(json.loads, open(f"{run}/eval_{name}/predictions.jsonl"))}
        for name in scores}
n = scores["sft"]["total"]
print(f"Held-out test split: {n} questions, greedy, CoT prompt\n")
print("| category | SFT | MPO |")
print("|---|---|---|")
for cat in scores["sft"]["categories"]:
    a, b = scores["sft"]["categories"][cat], scores["mpo"]["categories"][cat]
    print(f"| {cat} | {100 * a['accuracy']:.1f}% | {100 * b['accuracy']:.1f}% |")
print(f"| **overall** | **{100 * scores['sft']['accuracy']:.1f}%** ({scores['sft']['correct']}/{n}) |"
      f" **{100 * scores['mpo']['accuracy']:.1f}%** ({scores['mpo']['correct']}/{n}) |")
# Paired comparison on the same questions: exact two-sided sign (McNemar) test on the discordant ones.
gained = sum(rows["mpo"][i] and not rows["sft"][i] for i in rows["sft"])
lost = sum(rows["sft"][i] and not rows["mpo"][i] for i in rows["sft"])
k, m = min(gained, lost), gained + lost
p = min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2**m) if m else 1.0
print(f"\nMPO fixed {gained} answers and broke {lost}; exact McNemar p = {p:.2g}")
json.dump({"fixed": gained, "broke": lost, "p": p}, open(f"{run}/comparison.json", "w"))
EOF
log "total $(( $(stamp) - T0 ))s"

if [ "${INSTALL:-0}" = 1 ]; then
  # the MPO stage ships only where it answers more test questions than the SFT stage, outside the noise
  BEST=$(python -c "import json; c = json.load(open('$RUN/comparison.json')); print('mpo' if c['fixed'] > c['broke'] and c['p'] < 0.05 else 'sft')")
  find "$DEST" -maxdepth 1 -type f ! -name README.md -delete
  cp "$RUN/$BEST"/final/* "$DEST"/
  log "installed $RUN/$BEST/final into $DEST; its README.md (the model card) and the README's demo section still describe the earlier checkpoint: update them from $RUN/results.md"
fi
