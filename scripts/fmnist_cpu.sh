#!/usr/bin/env bash
# The CPU-scale run: main model + weak guide on Fashion-MNIST, then every method on the same seeds.
# Resumable: rerun the script and each training continues from its state.pt.
# Usage: scripts/fmnist_cpu.sh [DATA_DIR] [RUN_DIR]   (defaults: Debian's dataset-fashion-mnist, runs/fmnist)
# Time budget: MAIN_MINUTES / GUIDE_MINUTES cap each training (the kimg caps are the presets').
set -euo pipefail
DATA=${1:-/usr/share/datasets/fashion-mnist}
RUN=${2:-runs/fmnist}
MAIN_MINUTES=${MAIN_MINUTES:-40}
GUIDE_MINUTES=${GUIDE_MINUTES:-7}
SEEDS=${SEEDS:-0-39}
STEPS=${STEPS:-20}
PY=${PY:-python}
mkdir -p "$RUN"
now() { date +%s.%N; }
declare -A T

t=$(now)
# Main: 1.7 M parameters; label dropout 0.1 so it is also its own unconditional model for CFG.
$PY -m mini_autoguide train "$DATA" --preset fmnist-main --out "$RUN/main" --label-dropout 0.1 \
    --max-minutes "$MAIN_MINUTES" --quiet
T[main]=$(echo "$(now) - $t" | bc)

t=$(now)
# Guide: the paper's recipe at small scale: a smaller model (0.4 M) trained for a fraction of the images.
$PY -m mini_autoguide train "$DATA" --preset fmnist-guide --out "$RUN/guide" \
    --max-minutes "$GUIDE_MINUTES" --quiet
T[guide]=$(echo "$(now) - $t" | bc)

MAIN=$RUN/main/network-latest-ema0.05.safetensors
GUIDE=$RUN/guide/network-latest-ema0.05.safetensors
COMMON="--seeds $SEEDS --steps $STEPS --sigma-max 80 --force"  # add --bf16 on CPUs with AMX / AVX-512 BF16
t=$(now); $PY -m mini_autoguide sample "$MAIN" --method none --out "$RUN/none" $COMMON; T[none]=$(echo "$(now) - $t" | bc)
t=$(now); $PY -m mini_autoguide sample "$MAIN" --method cfg --weight 2 --out "$RUN/cfg" $COMMON; T[cfg]=$(echo "$(now) - $t" | bc)
t=$(now); $PY -m mini_autoguide sample "$MAIN" --guide "$GUIDE" --method autoguidance --weight 2 \
    --out "$RUN/autoguidance" $COMMON; T[autoguidance]=$(echo "$(now) - $t" | bc)
t=$(now); $PY -m mini_autoguide sample "$MAIN" --guide "$GUIDE" --method autoguidance --weight 3 \
    --interval 0.3 5 --out "$RUN/autoguidance_interval" $COMMON; T[interval]=$(echo "$(now) - $t" | bc)

$PY -m mini_autoguide grid "$RUN"/{none,cfg,autoguidance,autoguidance_interval}/grid.png \
    --titles "no guidance" "CFG w=2" "autoguidance w=2" "autoguidance w=3, sigma in [0.3, 5]" --columns 2 \
    --out "$RUN/side_by_side.png" --force

$PY - "$RUN" <<PYEOF
import json, sys
run = sys.argv[1]
logs = {k: [json.loads(l) for l in open(f"{run}/{k}/log.jsonl")] for k in ("main", "guide")}
out = {"seconds": {"train_main": ${T[main]}, "train_guide": ${T[guide]}, "sample_none": ${T[none]},
                   "sample_cfg": ${T[cfg]}, "sample_autoguidance": ${T[autoguidance]},
                   "sample_autoguidance_interval": ${T[interval]}},
       "trained_images": {k: v[-1]["nimg"] for k, v in logs.items()},
       "final_loss": {k: v[-1]["loss"] for k, v in logs.items()},
       "seeds": "$SEEDS", "steps": $STEPS}
out["seconds"]["total"] = sum(out["seconds"].values())
json.dump(out, open(f"{run}/timings.json", "w"), indent=2)
print(json.dumps(out, indent=2))
PYEOF
