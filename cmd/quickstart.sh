#!/usr/bin/env bash
# Bootstrap .venv, then train and evaluate a small ViT on the embedded DIGITS set (CPU, about 2-3 minutes).
source "$(dirname "$0")/_bootstrap.sh"
out="${1:-outputs/quickstart}"
# One compute thread plus one loader process fits a 2-core machine; more threads only contend.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python main.py --model vit_digits_tiny --data-set DIGITS --epochs 60 --batch-size 64 --lr 1e-2 \
  --warmup-epochs 3 --drop-path 0 --mixup 0 --cutmix 0 --reprob 0 --aa none --color-jitter 0 --hflip 0 \
  --no-repeated-aug --no-model-ema --num_workers 1 --no-pin-mem --print-freq 1000 --output_dir "$out" --auto-resume
.venv/bin/python main.py --model vit_digits_tiny --data-set DIGITS --num_workers 1 --no-pin-mem --no-model-ema \
  --eval --resume "$out/checkpoint.pth"
echo "outputs: $out/checkpoint.pth (last), $out/best.pth, $out/log.txt (one JSON line per epoch), $out/config.json"
