#!/usr/bin/env bash
# Reproduce the shipped default model, ddpm_fast/assets/digits16.safetensors, and its loss curve.
#
# Trains the digits16 preset (1 x 16 x 16, ~2.2M parameters) on the built-in "digits" dataset
# (scikit-learn's 8x8 digits, upscaled; needs `pip install ddpm_fast[data]`) on the CPU, then exports
# the EMA weights as float16 (loading upcasts to float32) and copies the loss log next to them.
# The shipped model was made by exactly these commands on a shared 2-core CPU (see the loss CSV's
# elapsed_s column for the wall time). Training is a pure function of (seed, step): a run interrupted
# and continued with --resume ends with the same weights, so RUN can be resumed if it is stopped.
#
#   usage: scripts/train_default_model.sh [RUN_DIR]      (default RUN_DIR: runs/digits16)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/digits16}"
STEPS="${STEPS:-5000}"
# One thread: on the shared 2-core machine two OpenMP threads spin-wait against the other users' jobs
# and ran 3x slower (measured 0.6 vs 1.9 it/s at batch 64). Raise it on a machine of your own.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

RESUME=()
[ -f "$RUN/checkpoint.safetensors" ] && RESUME=(--resume)

# `python -m ddpm_fast.training` takes the same flags as `ddpm-fast train`.
python -m ddpm_fast.training --data digits --preset digits16 --out "$RUN" \
    --steps "$STEPS" --batch-size 64 --lr 5e-4 --warmup-steps 200 --ema-decay 0.999 --grad-clip 1.0 \
    --checkpoint-every 250 --sample-every 1000 --log-every 50 --seed 0 --device cpu "${RESUME[@]}"

python - "$RUN" <<'PY'
import shutil, sys, torch
from pathlib import Path
from ddpm_fast.training import export_model, plot_loss
run, assets = Path(sys.argv[1]), Path("ddpm_fast/assets")
export_model(run / "checkpoint.safetensors", assets / "digits16.safetensors", dtype=torch.float16)
shutil.copyfile(run / "loss.csv", assets / "digits16_loss.csv")
if not plot_loss(assets / "digits16_loss.csv", assets / "digits16_loss.png", "digits16 training loss"):
    print("matplotlib not installed: no loss plot")
print("wrote", *sorted(str(p) for p in assets.glob("digits16*")))
PY
