#!/usr/bin/env bash
# Headless Chromium for the web view's browser test (tests/test_ui.py), from the distribution's
# packages: Playwright drives it through executable_path, so no browser is downloaded. Idempotent:
# nothing happens when /usr/bin/chromium exists. Needs root (CI runs `make test` as root); without
# root and without chromium it says so and exits 0, and the browser test skips with that reason.
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here; install Chromium at $CHROMIUM for the browser test" >&2
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_browser.sh: not root; run 'apt-get install -y chromium' as root for the browser test" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --version
