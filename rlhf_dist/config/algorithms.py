"""The online algorithm table: one row per value of `algorithm`. The config checks, placement and the PPO
driver's setup read from here what differs between algorithms; nothing else names one.

A new critic-free algorithm is a row here and, when its advantages are new, an estimator in
`algo/advantages.ESTIMATORS`. (Torch-free on purpose: the config loads without torch.)
"""

from __future__ import annotations

from dataclasses import dataclass

KL_PLACEMENTS = ("reward", "loss")


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: str  # its estimator in algo.advantages.ESTIMATORS
    critic: bool  # starts a critic (its role, learner and the fields of checks.CRITIC_FIELDS)
    kl_in: tuple[str, ...] = KL_PLACEMENTS  # the KL placements (kl_in) it allows
    min_samples: int = 1  # n_samples_per_prompt it needs: 2 for a baseline from the prompt's other samples
    groups: bool = False  # its advantages compare a prompt's samples: a failed reward drops the whole group
    own_fields: tuple[str, ...] = ()  # fields only it reads: another algorithm must leave them at their default


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", "gae", critic=True),
    Algorithm("grpo", "grpo", critic=False, min_samples=2, groups=True, own_fields=("grpo_norm_std",)),
    Algorithm("rloo", "rloo", critic=False, min_samples=2, groups=True),
    Algorithm("reinforce_pp", "reinforce_pp", critic=False, groups=True),  # the group-mean baseline
)}
