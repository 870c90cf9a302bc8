#!/usr/bin/env bash
# One node, NUM_GPUS processes (NCCL on GPUs; gloo if run with --device cpu). Extra arguments go to main.py.
# usage: bash cmd/launch_single_node.sh NUM_GPUS --model deit_small_patch16_224 --data-set IMNET --data-path /data/imagenet ...
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash $0 NUM_GPUS [main.py flags...]" >&2; exit 2; }
nproc="$1"; shift
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc_per_node="$nproc" main.py "$@"
