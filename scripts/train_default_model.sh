#!/usr/bin/env bash
# Trains a shipped model (models/default/) from scratch on built-in data, on 2 CPU cores: stage 1
# (20 min; for emoji then its decoder fine-tuned with the PatchGAN, 10 min), stage 2 (emoji ~25 min,
# shapes ~40), an fp16 copy, then a ControlNet on that copy (25 min) and its fp16 copy. The budgets are in
# the configs: train.max_minutes for emoji's stage 1, decoder and ControlNet; train.max_steps (about those
# quiet minutes) for both stage 2s, whose lr cools down over the steps, and for all of shapes. Both files go
# to MODEL_DIR only once both exist, so a failed run leaves the shipped pair as it was.
#
#   bash scripts/train_default_model.sh [RUNS_DIR] [MODEL_DIR]     (defaults: runs/default models/default)
#   DATA=shapes bash scripts/train_default_model.sh                (runs/shapes; shapes.safetensors and
#                                                                   controlnet-shapes-edges.safetensors)
#
# DATA=emoji (the default): captions are emoji names, the ControlNet reads Canny edges. DATA=shapes:
# compositional scenes ("a small red circle at the top left on a white background"), the ControlNet reads
# the scenes' exact outlines; the autoencoder is the emoji one with 8 latent channels, trained on 20,000
# scenes for 4,000 steps (configs/autoencoder/kl-f4-shapes64.yaml: what 20 quiet minutes on 2 cores give,
# as a step budget, because a time budget on a loaded machine trained 2,827 steps: bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-emoji}
case "$DATA" in
  emoji)  STAGE1=configs/autoencoder/kl-f4-emoji64.yaml; STAGE2=configs/ldm/emoji64.yaml
          CONTROL=configs/controlnet/emoji-canny.yaml; MODEL_NAME=model; CONTROL_NAME=controlnet-canny
          DECODER=configs/autoencoder/kl-f4-emoji64-decoder.yaml ;;
  shapes) STAGE1=configs/autoencoder/kl-f4-shapes64.yaml; STAGE2=configs/ldm/shapes64.yaml
          CONTROL=configs/controlnet/shapes-edges.yaml; MODEL_NAME=shapes; CONTROL_NAME=controlnet-shapes-edges
          DECODER= ;;
  *) echo "DATA must be emoji or shapes, not '$DATA'" >&2; exit 2 ;;
esac
RUNS=${1:-runs/$([ "$DATA" = emoji ] && echo default || echo "$DATA")}
MODEL=${2:-models/default}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1

$PY train_stage1.py --config "$STAGE1" train.output_dir="$RUNS/stage1"
FIRST_STAGE="$RUNS/stage1/autoencoder.safetensors"
if [ -n "$DECODER" ]; then  # the encoder, hence the latents stage 2 trains on, stay stage 1's
  $PY train_stage1.py --config "$DECODER" init_from="$FIRST_STAGE" train.output_dir="$RUNS/decoder"
  FIRST_STAGE="$RUNS/decoder/autoencoder.safetensors"
fi
$PY train_stage2.py --config "$STAGE2" --first-stage "$FIRST_STAGE" \
    train.output_dir="$RUNS/stage2" latent_cache_dir="$RUNS/latent_cache"
$PY scripts/fp16_copy.py "$RUNS/stage2/model.safetensors" "$RUNS/fp16/$MODEL_NAME.safetensors"
$PY train_controlnet.py --config "$CONTROL" --stage2 "$RUNS/fp16/$MODEL_NAME.safetensors" \
    train.output_dir="$RUNS/controlnet" latent_cache_dir="$RUNS/latent_cache"
$PY scripts/fp16_copy.py "$RUNS/controlnet/controlnet.safetensors" "$RUNS/fp16/$CONTROL_NAME.safetensors"
mkdir -p "$MODEL"
cp "$RUNS/fp16/$MODEL_NAME.safetensors" "$RUNS/fp16/$CONTROL_NAME.safetensors" "$MODEL/"
echo "wrote $MODEL/$MODEL_NAME.safetensors and $MODEL/$CONTROL_NAME.safetensors"
