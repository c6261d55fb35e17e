"""Every online algorithm, and DPO, on the bundled demo task from one SFT model: the gold metric (the demo's
rule `gold_score` per response, through `rlhf_dist.demo:positivity_reward`, on the held-out eval prompts)
before and after, and the seconds each took.

    python scripts/bench_algorithms.py [--out runs/algorithms] [--iterations 20] [k=v ...]

The quickstart config throughout; each online algorithm generates the same 32 samples per iteration
(ppo 32 prompts x 1, grpo and rloo 8 x 4, reinforce_pp 16 x 2) and learns from the rule reward only
(`rlhf_dist.demo:positivity_reward`, no reward model). DPO trains on the preference pairs. The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONLINE = {
    "ppo": ["ppo_batch_size=32"],
    "grpo": ["ppo_batch_size=8", "n_samples_per_prompt=4", "kl_in=loss"],
    "rloo": ["ppo_batch_size=8", "n_samples_per_prompt=4"],
    "reinforce_pp": ["ppo_batch_size=16", "n_samples_per_prompt=2"],
}
# The quickstart sets the critic's learning rate; critic-free algorithms refuse critic settings, so put
# it back to its default for them.
NO_CRITIC = ["ppo_lr_value=1e-05"]
RULE = ["reward_fn=rlhf_dist.demo:positivity_reward", "reward_model_weight=0", "wandb.mode=disabled"]


def timed(args: list[str], log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        subprocess.run(["rlhf-dist", *args], stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/algorithms")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rlhf-dist", "init-tiny", str(out / "tiny")], check=True, stdout=subprocess.DEVNULL)
    cfg = out / "config.yaml"
    cfg.write_text((ROOT / "configs/quickstart.yaml").read_text().replace("runs/tiny", str(out / "tiny")))
    extra = [f"ppo_iterations={a.iterations}", *a.overrides]
    seconds = {"sft": timed(["sft", str(cfg), f"save_dir={out / 'base'}", *RULE, *extra], out / "sft.log")}
    models = {"sft": out / "base" / "sft" / "best_model"}
    for name, kw in [*ONLINE.items(), ("dpo", None)]:
        save = out / name
        shutil.rmtree(save, ignore_errors=True)
        shutil.copytree(out / "base" / "sft", save / "sft")
        if kw is None:
            seconds[name] = timed(["dpo", str(cfg), f"save_dir={save}", *RULE, *extra], out / f"{name}.log")
            models[name] = save / "dpo" / "best_model"
        else:
            kw = kw + (NO_CRITIC if name != "ppo" else [])
            seconds[name] = timed(["ppo", str(cfg), f"save_dir={save}", f"algorithm={name}", *kw, *RULE, *extra],
                                  out / f"{name}.log")
            models[name] = save / "ppo" / "final_model"
    from rlhf_dist.config import load_config
    from rlhf_dist.evaluation.evaluate import evaluate_model

    conf = load_config(cfg, [f"save_dir={out / 'base'}", *RULE, *extra])
    res = evaluate_model(conf, {k: str(v) for k, v in models.items()}, gold="rlhf_dist.demo:positivity_reward")
    table = {name: {"gold": res["checkpoints"][name].get("gold"), "seconds": round(seconds[name], 1)}
             for name in models}
    print(f"{'model':<14}{'gold':>8}{'seconds':>10}")
    for name, r in table.items():
        print(f"{name:<14}{r['gold'] if r['gold'] is not None else float('nan'):>8.3f}{r['seconds']:>10.1f}")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
