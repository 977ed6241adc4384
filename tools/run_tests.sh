#!/usr/bin/env bash
# The README's test command: install cutana with its test extras and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,slurm,ui]"
python -m pytest -v --durations=25 "$@"
