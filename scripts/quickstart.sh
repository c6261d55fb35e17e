#!/usr/bin/env bash
# One command: set up, build the tiny assets, run the whole pipeline (SFT -> RM -> PPO) on a local Ray.
# Output: runs/quickstart/. Extra arguments are config overrides, e.g. ppo_iterations=4.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
rlhf-dist init-tiny runs/tiny
rlhf-dist run configs/quickstart.yaml "$@"
