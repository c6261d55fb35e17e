#!/usr/bin/env bash
# The oldest transformers the package declares (pyproject: transformers>=4.56): load, tokenise, generate and
# score with it. It is laid over the venv in .venv-floor/ (no second venv); about 15 s once downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=.venv-floor
if [ ! -f "$floor/transformers/__init__.py" ]; then
  python -m pip install -q --target "$floor" --no-deps "transformers==4.56.2" "tokenizers==0.22.1" \
    "huggingface_hub>=0.34,<1.0"
fi
PYTHONPATH="$PWD/$floor" python - <<'PY'
import transformers
assert transformers.__version__ == "4.56.2", transformers.__version__
PY
PYTHONPATH="$PWD/$floor" python -m pytest -q -p no:cacheprovider tests/test_tiny.py tests/test_rollout.py tests/test_packing.py \
  tests/test_forward_batching.py tests/test_data.py
