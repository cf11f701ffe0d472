#!/usr/bin/env bash
# Static checks that need no Docker engine and no GPU. Exits non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
step() { echo "== $*"; }
step "ruff"; ruff check app tests bench || status=1
exit $status
