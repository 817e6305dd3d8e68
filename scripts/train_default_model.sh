#!/usr/bin/env bash
# Trains the shipped default model (models/default/) from scratch on the built-in emoji, on 2 CPU
# cores: stage 1 (20 min), stage 2 (40 min), an fp16 copy, then a Canny ControlNet on that copy
# (25 min) and its fp16 copy. The time budgets are train.max_minutes in the configs. Both files go
# to MODEL_DIR only once both exist, so a failed run leaves the shipped pair as it was.
#
#   bash scripts/train_default_model.sh [RUNS_DIR] [MODEL_DIR]     (defaults: runs/default models/default)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/default}
MODEL=${2:-models/default}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1

$PY train_stage1.py --config configs/autoencoder/kl-f4-emoji64.yaml train.output_dir="$RUNS/stage1"
$PY train_stage2.py --config configs/ldm/emoji64.yaml --first-stage "$RUNS/stage1/autoencoder.safetensors" \
    train.output_dir="$RUNS/stage2" latent_cache_dir="$RUNS/latent_cache"
$PY scripts/fp16_copy.py "$RUNS/stage2/model.safetensors" "$RUNS/fp16/model.safetensors"
$PY train_controlnet.py --config configs/controlnet/emoji-canny.yaml --stage2 "$RUNS/fp16/model.safetensors" \
    train.output_dir="$RUNS/controlnet" latent_cache_dir="$RUNS/latent_cache"
$PY scripts/fp16_copy.py "$RUNS/controlnet/controlnet.safetensors" "$RUNS/fp16/controlnet-canny.safetensors"
mkdir -p "$MODEL"
cp "$RUNS/fp16/model.safetensors" "$RUNS/fp16/controlnet-canny.safetensors" "$MODEL/"
echo "wrote $MODEL/model.safetensors and $MODEL/controlnet-canny.safetensors"
