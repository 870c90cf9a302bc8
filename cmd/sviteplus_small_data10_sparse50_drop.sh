#!/usr/bin/env bash
# SViTE+-Small: 10% data sparsity (keep 177 of the 197 tokens) and 50% unstructured weight sparsity;
# dropped tokens are removed from the sequence, which saves compute (the original only zeroed them).
# Paper top-1 (zero mode): 79.91. Original: cmd/vm/0517/line67.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --density 0.5 --update_frequency 15000 \
  --token_selection --token_number 177 --token-mode drop -- "$@"
