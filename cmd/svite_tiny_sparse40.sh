#!/usr/bin/env bash
# SViTE-Tiny, unstructured, 40% sparsity (density 0.6). Original: cmd/vm/0422/vm1.
# The paper's Tiny numbers were not recovered; the original ran Tiny at densities 0.5, 0.6, 0.7.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_tiny_patch16_224 --batch-size 64 --density 0.6 --update_frequency 15000 -- "$@"
