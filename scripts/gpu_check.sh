#!/usr/bin/env bash
# The GPU check: the quickstart pipeline in bf16 (bf16: auto) on whatever GPUs are visible, PPO cut to 4
# iterations, then PPO again under ZeRO-3 from the same SFT and reward models. Prints each stage's time, the
# first mini-batch's ratio, the weight sync's seconds and bytes, and the peak memory of every role; the last
# line is JSON. Sized to fit in 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (OUT_DIR defaults to $OUT, else runs/gpu_check)
#
# On the offline GPU machine: bash ../shared/scripts/gpu-wheels.sh here first, carry .whl, then
#   source .whl/env.sh && bash scripts/gpu_check.sh "$OUT"
# GPU_CHECK_DEVICE=cpu runs the same steps on a CPU (float32), to try the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-runs/gpu_check}}")
device=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
rlhf-dist init-tiny "$out/tiny" >/dev/null
sed "s#runs/tiny#$out/tiny#g" configs/quickstart.yaml > "$out/config.yaml"
common=(device="$device" ppo_iterations=4 save_interval=2 sft_epochs=2 wandb.mode=disabled)

stage() {  # name, seconds allowed, then the rlhf-dist arguments
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" rlhf-dist "$@" > "$out/$name.log" 2>&1 || rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (log: $out/$name.log)"
  [ "$rc" = 0 ] || tail -n 5 "$out/$name.log"
}

stage pipeline 300 run "$out/config.yaml" "${common[@]}" save_dir="$out/zero2"
mkdir -p "$out/zero3"
for d in sft reward_model; do  # the same SFT and reward models: only PPO runs again
  [ -d "$out/zero2/$d" ] && cp -r "$out/zero2/$d" "$out/zero3/"
done
stage ppo_zero3 180 ppo "$out/config.yaml" "${common[@]}" zero_stage=3 save_dir="$out/zero3"
python3 scripts/gpu_summary.py "$out/zero2" "$out/zero3"
