#!/usr/bin/env bash
# SViTE-Small, unstructured, 30% sparsity (density 0.7). Original: cmd/vm/0508/line71.
# Paper top-1: 80.48 (read off the README figure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_small_patch16_224 --batch-size 64 --density 0.7 --update_frequency 15000 -- "$@"
