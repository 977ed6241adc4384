#!/usr/bin/env bash
# Install what the UI browser test (tests/test_ui_browser.py, marker `browser`) needs:
#   - Debian's chromium (Playwright drives the SYSTEM browser; `playwright install` downloads
#     browser builds, which this project never does);
#   - the Python packages of the [ui] extra plus playwright (the client library only).
# Idempotent: does nothing that is already there. Usage: bash tools/ui_browser_setup.sh
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; else SUDO=""; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # fonts-dejavu-core: readable text in screenshots on a minimal image.
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version 2>/dev/null | head -n 1

python - <<'PY' || python -m pip install -q "ipywidgets>=8.1" "voila>=0.5" "pillow>=10" "playwright>=1.40"
import importlib.util, sys
missing = [m for m in ("ipywidgets", "voila", "PIL", "playwright") if importlib.util.find_spec(m) is None]
sys.exit(1 if missing else 0)
PY
