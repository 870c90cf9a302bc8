#!/usr/bin/env bash
# SViTE-Small, unstructured, 40% sparsity (density 0.6). Original: cmd/vm/0507/line67.
# Paper top-1: 80.28 (read off the README figure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --density 0.6 --update_frequency 15000 -- "$@"
