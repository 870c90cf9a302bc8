#!/usr/bin/env bash
# SViTE+-Small: 5% data sparsity (keep 187 of the 197 tokens) and 50% unstructured weight sparsity;
# dropped tokens are multiplied by zero, as the original did. Paper top-1: 80.18. Original: cmd/vm/0517/line67_new_95.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --density 0.5 --update_frequency 15000 \
  --token_selection --token_number 187 --token-mode zero -- "$@"
