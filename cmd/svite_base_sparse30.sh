#!/usr/bin/env bash
# SViTE-Base, unstructured, 30% sparsity (density 0.7). Original: cmd/vm/0508/line75.
# Paper top-1: 81.60 (read off the README figure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_base_patch16_224 --batch-size 128 --density 0.7 --update_frequency 7000 -- "$@"
