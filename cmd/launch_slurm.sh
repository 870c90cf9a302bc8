#!/usr/bin/env bash
# SLURM: one torchrun per node started by srun; torchrun spawns one process per GPU.
# usage: sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 cmd/launch_slurm.sh [main.py flags...]
#SBATCH --job-name=sviite
#SBATCH --ntasks-per-node=1
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
gpus="${SLURM_GPUS_PER_NODE:-8}"
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="${gpus##*:}" --rdzv_backend=c10d \
  --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID" main.py "$@"
