#!/usr/bin/env bash
# Several nodes with torchrun's standard c10d rendezvous. Run the same command on every node.
# usage: bash cmd/launch_multi_node.sh NUM_NODES GPUS_PER_NODE HEAD_NODE_ADDR:PORT JOB_ID [main.py flags...]
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: bash $0 NUM_NODES GPUS_PER_NODE HEAD_ADDR:PORT JOB_ID [main.py flags...]" >&2; exit 2; }
nnodes="$1"; nproc="$2"; endpoint="$3"; job="$4"; shift 4
cd "$(dirname "$0")/.."
exec torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d --rdzv_endpoint="$endpoint" \
  --rdzv_id="$job" main.py "$@"
