#!/usr/bin/env bash
# Submit the whole pipeline to a running Ray cluster as a Ray job:
#   scripts/submit.sh CONFIG [ADDRESS] [key=value overrides...]
# ADDRESS is the job server (the dashboard port), default $RAY_ADDRESS, else http://127.0.0.1:8265
# (e.g. through `ray dashboard cluster/aws-gpu.yaml` or `kubectl port-forward ... 8265`).
#
# The working directory is uploaded (minus runs/, .venv/, .git/, wandb/): the job runs this
# checkout's code and configs. The dependencies are not: the project must already be installed on
# every node (cluster/aws-gpu.yaml and the KubeRay image do that). Without that, add a "pip" entry to
# the runtime env, e.g. '"pip": ["deepspeed", "transformers", "msgspec", ...]' (slow: on every node, per job).
#
# Paths in CONFIG (model_name, data, save_dir) must be absolute and on storage every node shares:
# a relative path would resolve inside each node's unpacked copy of the working directory.
#
# Ray's token authentication: the client needs the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)
# and RAY_AUTH_MODE=token when the cluster uses it.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config="$1"
shift
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [ $# -gt 0 ] && [[ "$1" != *=* || "$1" == *://* ]]; then  # an ADDRESS, not a key=value override
  address="$1"
  shift
fi
# The job starts in the uploaded repository root: CONFIG is relative to it (or absolute on shared storage).
cd "$(dirname "$0")/.."
[ -f "$config" ] || { echo "submit.sh: config not found (relative to the repository root): $config" >&2; exit 2; }
ray_bin="${RAY_BIN:-ray}"

out="$("$ray_bin" job submit --address "$address" --working-dir . \
  --runtime-env-json '{"excludes": ["runs/", ".venv/", ".git/", "wandb/"]}' \
  --no-wait -- rlhf-dist run "$config" "$@" 2>&1)" || { echo "$out" >&2; exit 1; }
echo "$out"
id="$(printf '%s\n' "$out" | grep -o "raysubmit_[A-Za-z0-9]*" | head -n 1 || true)"
if [ -z "$id" ]; then
  echo "submit.sh: could not find the submission id in the output above" >&2
  exit 1
fi
cat <<EOF

submission id: $id
follow the logs: ray job logs --address $address --follow $id
status:          ray job status --address $address $id
stop:            ray job stop --address $address $id
EOF
