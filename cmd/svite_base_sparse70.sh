#!/usr/bin/env bash
# SViTE-Base, unstructured, 70% sparsity (density 0.3). Original: cmd/vm/0502/vm3.
# Paper top-1: 80.72 (read off the README figure).
# The original also ran it with ΔT 6000 (0424/vm9); 7000 is the run it resumed to the end, and every other
# Base run's ΔT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_base_patch16_224 --batch-size 128 --density 0.3 --update_frequency 7000 -- "$@"
