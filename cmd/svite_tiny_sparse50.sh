#!/usr/bin/env bash
# SViTE-Tiny, unstructured, 50% sparsity (density 0.5). Original: cmd/vm/0409/vm1.
# The paper's Tiny numbers were not recovered; the original ran Tiny at densities 0.5, 0.6, 0.7.
# The original also swept ΔT 20000 and 25000 here; 15000 is every other Tiny and Small run's ΔT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_tiny_patch16_224 --batch-size 64 --density 0.5 --update_frequency 15000 -- "$@"
