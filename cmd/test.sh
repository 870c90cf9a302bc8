#!/usr/bin/env bash
# Bootstrap .venv, then run the whole pytest suite (CPU only). Extra arguments go to pytest.
source "$(dirname "$0")/_bootstrap.sh"
exec .venv/bin/python -m pytest -q tests "$@"
