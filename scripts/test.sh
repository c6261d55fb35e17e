#!/usr/bin/env bash
# One command: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
python -m pytest -q "$@"
