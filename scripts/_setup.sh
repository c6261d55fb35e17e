# Sourced by quickstart.sh and test.sh: a venv with the project installed.
# Creates .venv in the repo root unless a virtualenv is already active.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned here (not in pyproject.toml): on this project's CPU machines 2.13.0 is a local
# CPU build, while an unpinned torch pulls a multi-GB CUDA build. GPU users keep the torch they have.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${RLHF_DIST_EXTRAS:-test}]"
