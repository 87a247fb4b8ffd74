#!/usr/bin/env bash
# Golem for the golem tests: golem-core, gvmkit-build and the real yagna binary (from the
# golem-node wheel). The tests start their own yagna, offline, on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[golem]"
yagna --version
command -v gvmkit-build
