"""Every online algorithm end to end on the tiny demo task (Ray actors, DeepSpeed learners, CPU): after a
short SFT, each runs from the same SFT model with the rule reward and must raise it. Critic-free ones start
no critic and save none. One more run scores with a reward model and a reward function, both weighted."""

import json
import shutil
import statistics

import pytest
import torch
from conftest import base_config, iteration_rows

from rlhf_dist.config import load_config
from rlhf_dist.io.checkpoint import atomic_dir, mark_stage_finished
from rlhf_dist.io.tracking import read_metrics
from rlhf_dist.online.driver import run_ppo
from rlhf_dist.pipeline import create_rlhf_pipeline

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

ALGOS = {
    "ppo": {},
    "grpo": {"n_samples_per_prompt": 4, "kl_in": "loss"},
    "rloo": {"n_samples_per_prompt": 4},
    "reinforce_pp": {"n_samples_per_prompt": 2},
}


@pytest.fixture(scope="module")
def sft(tiny, tmp_path_factory, local_ray):
    save = tmp_path_factory.mktemp("sft") / "run"
    create_rlhf_pipeline(base_config(tiny, save, sft_epochs=4)).run_sft()
    return save


def run(tiny, sft, tmp_path_factory, algorithm, **kw):
    save = tmp_path_factory.mktemp(algorithm) / "run"
    shutil.copytree(sft / "sft", save / "sft")
    # The same number of samples per iteration for every algorithm: 32 = prompts x samples per prompt.
    n = ALGOS[algorithm].get("n_samples_per_prompt", 1)
    cfg = base_config(tiny, save, algorithm=algorithm, ppo_iterations=8, ppo_batch_size=32 // n,
                      ppo_mini_batch_size=16, ppo_epochs=2, ppo_lr_policy=1e-3, kl_coef=0.01, save_interval=4,
                      reward_fn="rlhf_dist.demo:positivity_reward", reward_model_weight=0.0, **ALGOS[algorithm], **kw)
    if algorithm != "ppo":  # critic settings with a critic-free algorithm are errors
        del cfg["ppo_lr_value"], cfg["roles"]["critic"]
    run_ppo(load_config(cfg), "cpu")
    return save


@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_algorithm_raises_the_reward(algorithm, tiny, sft, tmp_path_factory):
    save = run(tiny, sft, tmp_path_factory, algorithm)
    rows = iteration_rows(save)
    rewards = [r["reward_mean"] for r in rows]
    assert statistics.mean(rewards[-3:]) > statistics.mean(rewards[:2]) + 0.2, rewards
    assert all(r["algorithm"] == algorithm for r in rows)
    summary = [r for r in read_metrics(save / "ppo" / "metrics.jsonl") if r.get("summary")][-1]
    has_critic = algorithm == "ppo"
    assert ("critic-0" in summary["peak_memory_mb"]) == has_critic  # no critic actor was started
    assert (save / "ppo" / "iteration_000008" / "critic").exists() == has_critic
    assert (save / "ppo" / "final_model" / "critic").exists() == has_critic
    samples = read_metrics(save / "ppo" / "samples.jsonl")
    assert all(s["group"] == s["sample_id"] // ALGOS[algorithm].get("n_samples_per_prompt", 1) for s in samples)


def test_reward_model_and_function_both_weighted(tiny, sft, tmp_path_factory):
    """A reward model (the SFT model with a fresh score head, sealed as a finished stage) and the rule
    reward, weighted 0.5 and 2: the score is their weighted sum, before normalisation. The critic starts
    from the reward model. eval_every logs held-out figures."""
    from rlhf_dist.models.load import load_scalar_model, load_tokenizer, save_hf

    save = tmp_path_factory.mktemp("rm_fn") / "run"
    shutil.copytree(sft / "sft", save / "sft")
    src = str(save / "sft" / "best_model")
    torch.manual_seed(0)
    with atomic_dir(save / "reward_model" / "best_model") as tmp:
        save_hf(load_scalar_model(src, pad_token_id=load_tokenizer(src).pad_token_id), load_tokenizer(src), tmp)
    mark_stage_finished(save / "reward_model" / "best_model")
    cfg = base_config(tiny, save, ppo_iterations=2, save_interval=2, reward_fn="rlhf_dist.demo:positivity_reward",
                      reward_fn_weight=2.0, reward_model_weight=0.5, critic_init="reward", reward_normalize=True,
                      eval_every=1, eval_num_prompts=8)
    run_ppo(load_config(cfg), "cpu")
    rows = iteration_rows(save)
    for r in rows:
        assert r["score_raw_mean"] == pytest.approx(0.5 * r["rm_score"] + 2.0 * r["fn_score"], rel=1e-4, abs=1e-5)
    assert rows[0]["reward_mean"] == pytest.approx(0.0, abs=1e-5)  # the first batch: normalised by its own moments
    for r in rows:  # eval_every 1: held-out figures each iteration, raw scores (not normalised)
        assert r["eval/reward_mean"] == pytest.approx(0.5 * r["eval/rm_score"] + 2.0 * r["eval/fn_score"], abs=1e-5)
        assert r["eval/kl"] is not None and r["eval/response_length"] > 0 and r["time/eval"] > 0
    state = json.loads((save / "ppo" / "iteration_000002" / "state.json").read_text())
    assert state["reward_moments"]["count"] == 2 * 16  # both iterations' scores, kept for a resume
