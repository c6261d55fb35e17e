"""Figures of finished runs for scripts/gpu_check.sh: stage times, the first mini-batch's ratio, the weight
sync, peak memory per role, the SFT and reward stages' start-up breakdown. One block per run; the last line is JSON of all of them.

    python scripts/gpu_summary.py SAVE_DIR [SAVE_DIR ...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rlhf_dist.io.tracking import read_metrics


def summarise(save: Path) -> dict:
    log = (save / "logs" / "run.log").read_text(encoding="utf-8") if (save / "logs" / "run.log").is_file() else ""
    out: dict = {"save_dir": str(save),
                 "stage_seconds": {m[0]: float(m[1]) for m in re.findall(r"stage (\w+): done in ([\d.]+)s", log)},
                 "precision": re.findall(r"precision: (.*)", log)[-1:],
                 "weight_sync": re.findall(r"weight sync: (.*)", log)[-1:]}
    rows = read_metrics(save / "ppo" / "metrics.jsonl")
    its = [r for r in rows if not r.get("summary")]
    if its:
        out["first_ratio_mean"] = [r.get("first_ratio_mean") for r in its]
        out["first_ratio_dev_max"] = [r.get("first_ratio_dev_max") for r in its]
        out["rollout_logprob_diff"] = [r.get("rollout_logprob_diff") for r in its]
        out["sync_seconds"] = [r.get("time/sync") for r in its]
        out["sync_bytes"] = [r.get("sync_bytes") for r in its]
        out["reward_mean"] = [r.get("reward_mean") for r in its]
    summary = [r for r in rows if r.get("summary")]
    if summary:
        out["peak_memory_mb"] = summary[-1].get("peak_memory_mb")
    for stage, sub in (("sft", "sft"), ("reward", "reward_model")):  # where each stage's start-up went
        done = [r for r in read_metrics(save / sub / "metrics.jsonl") if r.get("summary")] \
            if (save / sub / "metrics.jsonl").is_file() else []
        if done and done[-1].get("startup_s"):
            out[f"{stage}_startup_s"] = {k: round(v, 2) for k, v in done[-1]["startup_s"].items()}
    return out


def main(argv: list[str]) -> int:
    runs = [summarise(Path(a)) for a in argv]
    for r in runs:
        print(f"== {r['save_dir']}")
        for k, v in r.items():
            if k != "save_dir":
                print(f"  {k}: {v}")
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
