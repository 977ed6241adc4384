#!/usr/bin/env bash
# The README's test command: install cutana with its test extras and run the whole suite.
# The browser test needs Debian's chromium: installed here when missing and apt-get is usable
# (root); the SLURM tests install and start their local cluster themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,slurm,ui]"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    bash tools/ui_browser_setup.sh || echo "chromium could not be installed: the browser test will skip"
fi
python -m pytest -v --durations=25 "$@"
