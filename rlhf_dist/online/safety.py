"""The safety filter in online RL: one call per iteration, after the rewards, before the advantages.

It runs `safety_filter` (rlhf_dist/rewards/safety.py) on the decoded responses, then penalises or drops the flagged
rollouts (`algo.safety_adjust`), and gives the driver the iteration's safety metrics and the flagged
rollouts' rows for samples.jsonl, each with its reason.
"""

from __future__ import annotations

import torch

from ..algo import safety_adjust
from ..rewards.safety import load_safety_filter


class SafetyCheck:
    """`safety_filter` with its action, loaded once at the start of the run."""

    def __init__(self, cfg, prompts):
        self.filter = load_safety_filter(cfg.safety_filter)
        self.action, self.penalty, self.n = cfg.safety_action, cfg.safety_penalty, cfg.n_samples_per_prompt
        self.prompts = prompts  # the prompt set; a sample's row is prompts[sample_id // n]

    def __call__(self, it: int, sample_ids: list[int], scores: torch.Tensor,
                 responses: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict, list[dict]]:
        """scores (B,) after the filter's action, the rollouts it drops (B,) bool, the metrics (`safety/*`),
        and a samples.jsonl row per flagged rollout."""
        prompts = [self.prompts[sid // self.n].prompt[-1]["content"] for sid in sample_ids]
        verdicts = self.filter(prompts, responses)
        flagged = torch.tensor([v.flagged for v in verdicts], dtype=torch.bool)  # (B,)
        scores, dropped = safety_adjust(scores, flagged, self.n, self.action, self.penalty)
        rec = {"safety/flagged_rate": flagged.float().mean().item(), "safety/dropped": int(dropped.sum())}
        rows = [{"iteration": it + 1, "sample_id": sid, "group": sid // self.n, "prompt": prompts[j],
                 "response": responses[j], "reward": float(scores[j]), "safety": v.reason,
                 "safety_action": self.action}
                for j, (sid, v) in enumerate(zip(sample_ids, verdicts)) if v.flagged]
        return scores, dropped, rec, rows
