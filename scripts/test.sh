#!/usr/bin/env bash
# One command: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
# With no arguments (as CI runs it), first the fast tests again on the oldest transformers we support.
[ $# -gt 0 ] || bash scripts/test_floor.sh
python -m pytest -q "$@"
