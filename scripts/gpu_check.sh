#!/usr/bin/env bash
# The GPU check, in parts that each fit one 10-minute command on a borrowed GPU machine (GPU_CHECK_PARTS,
# default all three, one after the other):
#   pipeline  the quickstart pipeline in bf16 (bf16: auto), PPO cut to 4 iterations, then PPO again under
#             ZeRO-3 from the same SFT and reward models: each stage's time (and the SFT and reward stages'
#             start-up breakdown), the first mini-batch's ratio, the weight sync's seconds and bytes, and the
#             peak memory of every role (scripts/gpu_summary.py; its last line is JSON). About 7 minutes.
#   learner   the learner benchmark on the 336M Llama (16k tokens per step, lengths 256-1024, padded and
#             packed). About 5 minutes.
#   rollout   the rollout benchmark (batch 64 and 256, prompt 128, 256 new tokens) of the HF and vLLM
#             engines (vLLM where installed) and transformers' generate. About 6 minutes.
# Each benchmark's last line is JSON, in OUT_DIR/<name>.log. The script exits 1 if any step failed.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (OUT_DIR defaults to $OUT, else runs/gpu_check)
#
# On the offline GPU machine: bash ../shared/scripts/gpu-wheels.sh here first, carry .whl, then per part
#   source .whl/env.sh && GPU_CHECK_PARTS=pipeline bash scripts/gpu_check.sh "$OUT"
# GPU_CHECK_DEVICE=cpu runs the same steps on a CPU (float32, smaller shapes), to try the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-runs/gpu_check}}")
device=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$out"
failed=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"

step() {  # name, seconds allowed, then the command; its output goes to OUT_DIR/<name>.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (log: $out/$name.log)"
  tail -n 4 "$out/$name.log" | cut -c1-400
  [ "$rc" = 0 ] || failed=1
}

parts=${GPU_CHECK_PARTS:-pipeline learner rollout}
shape=()  # the benchmarks' default model: the 336M Llama; on a CPU trial a small one
[ "$device" = cpu ] && shape=(--hidden 256 --layers 4 --heads 4 --kv-heads 2 --intermediate 688 --vocab 2048)
if [[ " $parts " == *" pipeline "* ]]; then
  rlhf-dist init-tiny "$out/tiny" >/dev/null
  sed "s#runs/tiny#$out/tiny#g" configs/quickstart.yaml > "$out/config.yaml"
  common=(device="$device" ppo_iterations=4 save_interval=2 sft_epochs=2 wandb.mode=disabled)
  step pipeline 300 rlhf-dist run "$out/config.yaml" "${common[@]}" save_dir="$out/zero2"
  mkdir -p "$out/zero3"
  for d in sft reward_model; do  # the same SFT and reward models: only PPO runs again
    [ -d "$out/zero2/$d" ] && cp -r "$out/zero2/$d" "$out/zero3/"
  done
  step ppo_zero3 180 rlhf-dist ppo "$out/config.yaml" "${common[@]}" zero_stage=3 save_dir="$out/zero3"
  step summary 60 python3 scripts/gpu_summary.py "$out/zero2" "$out/zero3"
fi
if [[ " $parts " == *" learner "* ]]; then
  learner=(scripts/bench_learner.py --device "$device" "${shape[@]}" --tokens 16384 --seq-len 1024 --min-len 256
           --steps 4)
  [ "$device" = cpu ] && learner=(scripts/bench_learner.py --device cpu "${shape[@]}" --tokens 2048 --seq-len 256
                                   --min-len 64 --steps 2)
  step learner_padded 150 python3 "${learner[@]}"
  step learner_packed 150 python3 "${learner[@]}" --pack "$([ "$device" = cpu ] && echo 2048 || echo 16384)"
fi
if [[ " $parts " == *" rollout "* ]]; then
  rollout=(scripts/bench_rollout.py --device "$device" "${shape[@]}")
  [ "$device" = cpu ] && rollout+=(--prompt 32 --new-tokens 32 --dtype float32 --no-hf-compile --reps 1)
  step rollout_b64 180 python3 "${rollout[@]}" --batch 64
  step rollout_b256 180 python3 "${rollout[@]}" --batch 256 --no-hf-compile
fi
exit "$failed"
