"""Distributed PPO end to end: Ray actors per role, DeepSpeed learners, gloo weight sync, on CPU."""

import json
import statistics

import pytest
import torch
from conftest import base_config, iteration_rows
from safetensors.torch import load_file

from rlhf_dist.io.checkpoint import is_complete
from rlhf_dist.pipeline import create_rlhf_pipeline

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def ppo_run(tiny, tmp_path_factory, local_ray):
    """SFT, then PPO against the rule-based positivity reward only (no reward model). The policy learner
    recomputes the old logprobs, so they can be compared with the rollout's, which come from the compiled
    decode step here (gen_compile; the other PPO tests decode eagerly)."""
    save = tmp_path_factory.mktemp("ppo") / "run"
    cfg = base_config(tiny, save, sft_epochs=4, ppo_iterations=8, ppo_batch_size=32, ppo_mini_batch_size=16,
                      ppo_epochs=2, ppo_lr_policy=1e-3, kl_coef=0.01, save_interval=4, ppo_recompute_old_logprobs=True,
                      reward_fn="rlhf_dist.demo:positivity_reward", reward_model_weight=0.0, gen_compile=True)
    pipe = create_rlhf_pipeline(cfg)
    pipe.run_sft()
    pipe.run_ppo_training()
    return save, iteration_rows(save)


def test_on_policy_first_minibatch(ppo_run):
    _, rows = ppo_run
    for r in rows:
        assert abs(r["first_ratio_mean"] - 1) < 1e-4 and r["first_ratio_dev_max"] < 1e-4
        assert r["rollout_logprob_diff"] < 1e-3  # rollout weights == learner weights: sync works


def test_weights_change_and_version_increases(ppo_run):
    save, rows = ppo_run
    assert [r["weight_version"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["rollout_version"] for r in rows] == list(range(len(rows)))  # stamped with the weights that made it
    sft = load_file(save / "sft" / "best_model" / "model.safetensors")
    final = load_file(save / "ppo" / "final_model" / "model.safetensors")
    assert all(not torch.equal(sft[k], final[k]) for k in sft)


def test_layout(ppo_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    save, _ = ppo_run
    for d in ("iteration_000004", "iteration_000008"):
        assert is_complete(save / "ppo" / d)
        AutoModelForCausalLM.from_pretrained(save / "ppo" / d / "policy")
        AutoModelForSequenceClassification.from_pretrained(save / "ppo" / d / "critic", num_labels=1)
        assert json.loads((save / "ppo" / d / "state.json").read_text())["iteration"] == int(d[-6:])
    AutoModelForCausalLM.from_pretrained(save / "ppo" / "final_model")


def test_reward_rises(ppo_run):
    _, rows = ppo_run
    rewards = [r["reward_mean"] for r in rows]
    assert statistics.mean(rewards[-3:]) > statistics.mean(rewards[:2]) + 0.2, rewards
    for key in ("kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy", "response_length",
                "time/rollout", "time/experience", "time/learner", "time/sync", "tokens_per_s", "fn_score"):
        assert all(r[key] is not None for r in rows), key
