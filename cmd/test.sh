#!/usr/bin/env bash
# Bootstrap .venv, then run the pytest suite (CPU only) in two worker processes of one thread each (pytest-xdist).
# --fast leaves out the tests marked slow (those that start a subprocess: main.py, torchrun, bash, pip).
# Other arguments go to pytest.
source "$(dirname "$0")/_bootstrap.sh"
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m "not slow")
fi
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "${select[@]}" "$@"
