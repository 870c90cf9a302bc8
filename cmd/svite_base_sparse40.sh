#!/usr/bin/env bash
# SViTE-Base, unstructured, 40% sparsity (density 0.6). Original: cmd/vm/0507/vm1.
# Paper top-1: 81.56 (the released checkpoint's accuracy).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_paper_run.sh"
paper_run "${SVITE[@]}" --model deit_base_patch16_224 --batch-size 128 --density 0.6 --update_frequency 7000 -- "$@"
