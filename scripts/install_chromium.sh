#!/usr/bin/env bash
# Install what tests/test_report_html.py needs to check the HTML report in a real browser:
# Debian's headless-capable Chromium and its matching chromedriver (apt), and Selenium (pip,
# into the virtualenv). Idempotent: does nothing that is already done.
#
#   scripts/install_chromium.sh            # uses .venv/bin/python
#   PYTHON=python3 scripts/install_chromium.sh
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
SELENIUM="${SELENIUM:-selenium>=4.20}"

if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromedriver ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core
fi

# Selenium goes into the virtualenv (it is in fasttrak's dev extra too, so `make test`
# installs it): only when that Python exists already.
if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c "import selenium" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "$SELENIUM"
fi

chromium --version 2>/dev/null  # its launcher script warns on stderr; harmless
/usr/bin/chromedriver --version
if command -v "$PYTHON" >/dev/null 2>&1; then
    "$PYTHON" -c "import selenium; print('selenium', selenium.__version__)" || true
fi
