#!/usr/bin/env bash
# SViTE-Small, unstructured, 60% sparsity (density 0.4). Original: cmd/vm/0426/vm1.
# Paper top-1: 79.40 (read off the README figure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --density 0.4 --update_frequency 15000 -- "$@"
