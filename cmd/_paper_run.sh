# Sourced by the paper-reproduction scripts (cmd/deit_*.sh, cmd/svite*.sh, cmd/s2vite_*.sh, ...): they only list flags.
# Each is run as:  bash cmd/NAME.sh [--dry-run] DATA_PATH NUM_GPUS OUTPUT_DIR [extra main.py flags...]
# and trains on ImageNet with `torchrun --standalone` on one node, writing to OUTPUT_DIR/NAME. The script's file
# name is the configuration's name, so two configurations can never share an output directory.
# No venv bootstrap here: cluster nodes bring their own environment (torch with CUDA); torchrun is taken from PATH.
set -euo pipefail

# SViTE's settings common to every sparse run (section 8 of the behaviour notes); the rest are main.py's DeiT
# defaults. The batch sizes and ΔT values in the scripts are per GPU for 8 GPUs, as the original ran them.
SVITE=(--epochs 600 --sparse_init fixed_ERK --growth gradient --death magnitude --redistribution none)

_paper_usage() {
  local script="$1"
  echo "usage: bash $script [--dry-run] DATA_PATH NUM_GPUS OUTPUT_DIR [extra main.py flags...]" >&2
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$script" >&2  # the script's header comment
  echo "--dry-run prints the torchrun command instead of running it. Batch and ΔT are per GPU for 8 GPUs:" >&2
  echo "on another count, scale --update_frequency (docs/reproduction.md#another-gpu-count)." >&2
}

# ΔT and the pruning interval count optimizer steps, and the scripts' steps are for 8 GPUs: say how to keep the
# schedule on NUM_GPUS.
_update_frequency_note() {
  local gpus="$1"; shift
  [ "$gpus" -eq 8 ] && return 0
  while [ $# -gt 1 ]; do
    if [ "$1" = "--update_frequency" ] && [ "$2" -gt 1 ]; then  # ΔT 1 (every step) holds on any count
      echo "note: ΔT $2 is for 8 GPUs; on $gpus keep the same updates per epoch with" \
           "--update_frequency $(( $2 * 8 / gpus )) (docs/reproduction.md#another-gpu-count)" >&2
    elif [ "$1" = "--prune-every" ]; then
      echo "note: --prune-every $2 is for 8 GPUs; on $gpus keep the same pruning steps per epoch with" \
           "--prune-every $(( $2 * 8 / gpus )) (docs/reproduction.md#another-gpu-count)" >&2
    fi
    shift
  done
}

# paper_run CONFIG_FLAGS... -- "$@": parse the user's arguments, then print or exec the torchrun command.
paper_run() {
  local script="${BASH_SOURCE[1]}" flags=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do flags+=("$1"); shift; done
  [ $# -gt 0 ] && shift  # the "--" separating the configuration's flags from the user's arguments
  local dry_run=false
  if [ "${1:-}" = "--dry-run" ]; then dry_run=true; shift; fi
  if [ $# -lt 3 ] || ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
    _paper_usage "$script"
    exit 2
  fi
  local data="$1" gpus="$2" out="${3%/}/$(basename "$script" .sh)"
  shift 3
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # Re-running a configuration (or a requeued job) continues it from OUTPUT_DIR/NAME/checkpoint.pth if present.
  local cmd=(torchrun --standalone --nproc_per_node="$gpus" "$root/main.py" --data-set IMNET --data-path "$data"
             "${flags[@]}" --output_dir "$out" --auto-resume "$@")
  _update_frequency_note "$gpus" "${flags[@]}"
  if $dry_run; then
    local line
    line="$(printf '%q ' "${cmd[@]}")"
    echo "${line% }"
  else
    exec "${cmd[@]}"
  fi
}
