"""PPO end to end with `rollout_engine: vllm` (vLLM's CPU build in the rollout actor), on a local
Ray with the fault hooks: the first mini-batch on-policy from vLLM's own log-probs, the reward rising, the
engine's process killed mid-run and survived, and a resume from a checkpoint. (GRPO groups as one vLLM request
with n: tests/test_vllm.py at the engine, tests/test_algorithms.py through the driver.)"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import faults
import pytest
from conftest import base_config, fault_hooked_ray, iteration_rows

from rlhf_dist.config import load_config
from rlhf_dist.online.driver import run_ppo
from rlhf_dist.pipeline import create_rlhf_pipeline

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]
KILL_ENGINE = {"target": "rlhf_dist.roles.actors:RolloutWorker.generate", "call": 3, "action": "kill_children"}


@pytest.fixture(scope="module")
def vllm_ray(tmp_path_factory):
    with fault_hooked_ray(tmp_path_factory.mktemp("faults")) as plan:
        yield plan


def config(tiny_vllm, save: Path, **kw) -> dict:
    kw = {"rollout_engine": "vllm", "vllm_cpu_kv_cache_gib": 0.25, "sft_epochs": 4, "ppo_batch_size": 32,
          "ppo_mini_batch_size": 16, "ppo_epochs": 2, "ppo_lr_policy": 1e-3, "kl_coef": 0.01, "save_interval": 2,
          "reward_fn": "rlhf_dist.demo:positivity_reward", "reward_model_weight": 0.0, **kw}
    return base_config(tiny_vllm, save, **kw)


def log_text(save: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((save / "logs").glob("*.log")))


@pytest.fixture(scope="module")
def ppo_vllm(vllm_ray, tiny_vllm, tmp_path_factory):
    """SFT; PPO for 5 iterations with the vLLM engine's processes SIGKILLed in iteration 3's rollout; then the
    run resumed from its last checkpoint up to 8 iterations."""
    save = tmp_path_factory.mktemp("vllm_ppo") / "run"
    create_rlhf_pipeline(config(tiny_vllm, save)).run_sft()
    logging.getLogger("rlhf_dist").setLevel(logging.INFO)
    faults.plan(vllm_ray, [KILL_ENGINE])
    run_ppo(load_config(config(tiny_vllm, save, ppo_iterations=5)), "cpu")
    first = iteration_rows(save)
    faults.plan(vllm_ray, [])
    run_ppo(load_config(config(tiny_vllm, save, ppo_iterations=8)), "cpu")
    return save, first, iteration_rows(save)


def test_rollout_logprobs_make_the_first_ratio_one(ppo_vllm):
    """Old log-probs from vLLM (float32, ppo_recompute_old_logprobs auto -> false): the learner's first
    mini-batch reproduces them, so vLLM returned the tempered, untruncated distribution."""
    _, _, rows = ppo_vllm
    for r in rows:
        assert abs(r["first_ratio_mean"] - 1) < 1e-3 and r["first_ratio_dev_max"] < 1e-3, r["iteration"]


def test_reward_rises_and_versions_move(ppo_vllm):
    _, _, rows = ppo_vllm
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert [r["rollout_version"] for r in rows] == list(range(8))
    rewards = [r["reward_mean"] for r in rows]
    assert statistics.mean(rewards[-3:]) > statistics.mean(rewards[:2]) + 0.2, rewards


def test_a_killed_engine_process_is_survived_and_the_run_resumes(ppo_vllm):
    save, first, _ = ppo_vllm
    assert [r["actor_restarts"] for r in first] == [0, 0, 1, 1, 1]
    text = log_text(save)
    assert "rollout-0: engine vllm (rollout_engine: vllm)" in text
    assert "the vLLM engine process died" in text
    assert "rollout-0 restarted after dying during phase 'experience'" in text  # the phase the driver retries
    assert "ppo: resuming from" in text
