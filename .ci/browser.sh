#!/usr/bin/env bash
# Debian's chromium for the app's browser tests (Playwright drives it; Playwright's own
# browser download cannot work where only the package registries are reachable).
set -euo pipefail
if ! command -v chromium >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
chromium --version
