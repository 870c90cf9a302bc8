#!/usr/bin/env bash
# S²ViTE-Tiny, structured, the paper's "40%" setting: 0.7 of the heads and 0.7 of the MLP neurons
# kept in every block. Paper top-1: 70.12. Original: cmd/vm/0428/deit_tiny_structure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_tiny_patch16_224 --batch-size 64 --pruning_type structure_new --t_end 0.8 \
  --atten_head 3 --atten_density 0.7 --other_density 0.7 --unit-multiple 1 --update_frequency 15000 -- "$@"
