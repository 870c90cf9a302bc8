#!/usr/bin/env bash
# DeiT-Small with 2:4 sparsity in every block linear (qkv, proj, fc1, fc2), learned by SR-STE from scratch: the mask
# is recomputed from the dense weights' magnitudes at every step, as in Zhou et al. (ICLR 2021). DeiT's 300-epoch
# recipe. Reported top-1 for SR-STE 2:4 DeiT-Small (Bi-Mask's table): 77.6 (dense 79.8). Not run here yet.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run --model deit_small_patch16_224 --batch-size 128 --epochs 300 --sparse_init nm --nm 2:4 \
  --nm-method srste --update_frequency 1 --t_end 1 -- "$@"
