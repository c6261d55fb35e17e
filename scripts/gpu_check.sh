#!/usr/bin/env bash
# The GPU check: the quickstart pipeline in bf16 (bf16: auto) on whatever GPUs are visible, PPO cut to 4
# iterations, then PPO again under ZeRO-3 from the same SFT and reward models. Prints each stage's time
# (and the SFT and reward stages' start-up breakdown), the first mini-batch's ratio, the weight sync's
# seconds and bytes, and the peak memory of every role. Then the learner benchmark on the 336M Llama of
# issue 19 (16k tokens per step, lengths 256-1024, padded and packed) and the rollout benchmark of issue
# 20 (batch 64 and 256, prompt 128, 256 new tokens), each with its last line JSON in OUT_DIR. The last line
# printed is the pipeline's JSON. At most about 11 minutes on one H200 (each part under a timeout);
# GPU_CHECK_PARTS picks parts, e.g. GPU_CHECK_PARTS="learner rollout".
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

bench() {  # name, seconds allowed, then the script and its arguments
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" python3 "$@" > "$out/$name.log" 2>&1 || rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (log: $out/$name.log)"
  tail -n 4 "$out/$name.log" | cut -c1-400
}

parts=${GPU_CHECK_PARTS:-pipeline learner rollout}
shape=()  # the benchmarks' default model: the 336M Llama of issues 19 and 20; on a CPU trial a small one
[ "$device" = cpu ] && shape=(--hidden 256 --layers 4 --heads 4 --kv-heads 2 --intermediate 688 --vocab 2048)
if [[ " $parts " == *" learner "* ]]; then
  learner=(scripts/bench_learner.py --device "$device" "${shape[@]}" --tokens 16384 --seq-len 1024 --min-len 256
           --steps 4)
  [ "$device" = cpu ] && learner=(scripts/bench_learner.py --device cpu "${shape[@]}" --tokens 2048 --seq-len 256
                                   --min-len 64 --steps 2)
  bench learner_padded 150 "${learner[@]}"
  bench learner_packed 150 "${learner[@]}" --pack "$([ "$device" = cpu ] && echo 2048 || echo 16384)"
fi
if [[ " $parts " == *" rollout "* ]]; then
  rollout=(scripts/bench_rollout.py --device "$device" "${shape[@]}")
  [ "$device" = cpu ] && rollout+=(--prompt 32 --new-tokens 32 --dtype float32 --bandwidth 0.02 --no-hf-compile)
  bench rollout_b64 150 "${rollout[@]}" --batch 64
  bench rollout_b256 120 "${rollout[@]}" --batch 256 --no-hf-compile
fi
if [[ " $parts " == *" pipeline "* ]]; then
  stage pipeline 240 run "$out/config.yaml" "${common[@]}" save_dir="$out/zero2"
  mkdir -p "$out/zero3"
  for d in sft reward_model; do  # the same SFT and reward models: only PPO runs again
    [ -d "$out/zero2/$d" ] && cp -r "$out/zero2/$d" "$out/zero3/"
  done
  stage ppo_zero3 150 ppo "$out/config.yaml" "${common[@]}" zero_stage=3 save_dir="$out/zero3"
  python3 scripts/gpu_summary.py "$out/zero2" "$out/zero3"
fi
