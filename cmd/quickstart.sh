#!/usr/bin/env bash
# Bootstrap .venv, then train dense, SViTE, S²ViTE and SViTE+ ViTs on the embedded DIGITS set (CPU: about 7
# CPU-minutes, 3 min 41 s measured on 2 idle cores) and print one table: top-1, non-zero params, theoretical and
# executed MACs, measured speedup against dense.
source "$(dirname "$0")/_bootstrap.sh"
out="${1:-outputs/quickstart-$(date +%Y%m%d-%H%M%S)}"  # a fresh directory: never trains into an earlier run
mkdir -p "$out"
# One compute thread per run, two runs at a time, no loader processes: fits a 2-core machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --data-set DIGITS brings its own recipe (lr, no mixup/cutmix/RandAugment/flips, ...), printed at the start of a run.
# The fused AdamW kernel and no EMA keep the four runs inside the quickstart's time budget; the trained models are
# the same recipe's (the EMA is a second, averaged copy that the table would not show).
common=(--model vit_digits_tiny --data-set DIGITS --epochs 45 --num_workers 0 --print-freq 100000 --opt-fused
        --no-model-ema)
declare -A flags=(
  [dense]=""
  [svite]="--sparse_init ERK --density 0.5 --update_frequency 25"
  [s2vite]="--pruning_type structure --atten_density 0.7 --other_density 0.6 --update_frequency 25"
  [sviteplus]="--token_selection --token-mode drop --token-ratio 0.7"
)
train() {  # name: train into $out/name, console output in $out/name.log
  # shellcheck disable=SC2086
  .venv/bin/python main.py "${common[@]}" ${flags[$1]} --output_dir "$out/$1" > "$out/$1.log" 2>&1 \
    || { echo "$1 failed; see $out/$1.log" >&2; tail -5 "$out/$1.log" >&2; return 1; }
  echo "$1: $(grep -m1 '^best top-1' "$out/$1.log")"
}
# A two-slot queue, slowest runs first: a slot frees as soon as its run ends (pairs would wait for the slower one).
running=0
failed=0
for name in svite s2vite dense sviteplus; do
  if [ "$running" -ge 2 ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  echo "training $name (log: $out/$name.log)"
  train "$name" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
[ "$failed" = 0 ] || exit 1
echo
.venv/bin/python benchmarks/quickstart_table.py "$out/dense" "$out/svite" "$out/s2vite" "$out/sviteplus"
echo
echo "runs in $out/<name>/: checkpoint.pth, best.pth, log.txt (one JSON line per epoch), config.json; s2vite/compact.pth"
echo "evaluate one again: .venv/bin/python main.py --eval --resume $out/svite/checkpoint.pth --num_workers 0"
