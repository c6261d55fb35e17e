#!/usr/bin/env bash
# One command: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
# With no arguments (as CI runs it), first the fast tests again on the oldest transformers we support.
[ $# -gt 0 ] || bash scripts/test_floor.sh
# And the lint (pyproject.toml [tool.ruff]: errors, pyflakes, import order).
[ $# -gt 0 ] || ruff check rlhf_dist scripts tests
python -m pytest -q --durations=25 "$@"
