"""PPO resume is exact: stop after 2 iterations, run again to 4, compare with 4 uninterrupted."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config
from rlhf_dist.pipeline import create_rlhf_pipeline
from rlhf_dist.tracking import read_metrics

pytestmark = pytest.mark.timeout(900)


def test_resume_equals_uninterrupted(tiny, tmp_path, local_ray):
    common = dict(sft_epochs=2, ppo_batch_size=16, ppo_mini_batch_size=8, ppo_epochs=2, ppo_lr_policy=5e-4,
                  save_interval=2, reward_fn="rlhf_dist.demo:positivity_reward", reward_model_weight=0.0)
    a, b = tmp_path / "a", tmp_path / "b"
    create_rlhf_pipeline(base_config(tiny, a, **common)).run_sft()
    shutil.copytree(a / "sft", b / "sft")

    create_rlhf_pipeline(base_config(tiny, a, ppo_iterations=4, **common)).run_ppo_training()
    create_rlhf_pipeline(base_config(tiny, b, ppo_iterations=2, **common)).run_ppo_training()  # "crash" at 2
    create_rlhf_pipeline(base_config(tiny, b, ppo_iterations=4, **common)).run_ppo_training()  # same command again

    assert "resuming from" in (b / "logs" / "run.log").read_text()
    ra = read_metrics(a / "ppo" / "metrics.jsonl")
    rb = read_metrics(b / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in rb] == [1, 2, 3, 4]  # nothing redone, nothing skipped
    for x, y in zip(ra, rb):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "weight_version"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["iteration"], key)
    wa = load_file(a / "ppo" / "final_model" / "model.safetensors")
    wb = load_file(b / "ppo" / "final_model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
