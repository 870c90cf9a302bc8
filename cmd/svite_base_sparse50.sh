#!/usr/bin/env bash
# SViTE-Base, unstructured, 50% sparsity (density 0.5). Original: cmd/vm/0416/vm9.
# Paper top-1: 81.52 (read off the README figure).
# The original also ran it with ΔT 6000 (0420/vm2); 7000 is every other Base run's ΔT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_base_patch16_224 --batch-size 128 --density 0.5 --update_frequency 7000 -- "$@"
