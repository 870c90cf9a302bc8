#!/usr/bin/env bash
# S²ViTE-Small, structured, the paper's "40%" setting: 0.7 of the heads and 0.6 of the MLP neurons
# kept in every block. Paper top-1: 79.22. Original: cmd/vm/0502/vm2.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --pruning_type structure_new --t_end 0.8 \
  --atten_head 6 --atten_density 0.7 --other_density 0.6 --unit-multiple 1 --update_frequency 15000 -- "$@"
