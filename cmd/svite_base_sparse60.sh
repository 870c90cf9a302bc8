#!/usr/bin/env bash
# SViTE-Base, unstructured, 60% sparsity (density 0.4). Original: cmd/vm/0426/vm3.
# Paper top-1: 81.28 (read off the README figure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_base_patch16_224 --batch-size 128 --density 0.4 --update_frequency 7000 -- "$@"
