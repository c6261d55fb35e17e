"""bf16: auto, and where PPO's old logprobs come from: pure rules, the config's checks, the CLI's error."""

import pytest
from conftest import base_config

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.models.precision import check_bf16, recompute_old_logprobs, use_bf16


def test_bf16_auto_means_bf16_on_cuda_only():
    assert use_bf16("auto", "cuda") and not use_bf16("auto", "cpu") and not use_bf16("auto", "mps")
    assert use_bf16(True, "cuda") and not use_bf16(False, "cuda")
    assert not use_bf16(True, "cpu")  # a 0-GPU role in a GPU run stays float32
    assert check_bf16("auto", "cpu") is False and check_bf16("auto", "cuda") is True


def test_explicit_bf16_without_a_gpu_is_an_error():
    with pytest.raises(ConfigError, match="bf16: true needs a CUDA GPU, but the run's device is cpu"):
        check_bf16(True, "cpu")


@pytest.mark.parametrize("setting, rollout_bf16, learner_bf16, want", [
    ("auto", False, False, False),  # float32 on both sides: the rollout's logprobs are the learner's (~1e-6)
    ("auto", True, True, True),  # bf16: decode and training forward differ; recompute
    ("auto", False, True, True),  # a float32 CPU rollout beside a bf16 learner
    (True, False, False, True),
    (False, True, True, False),  # asked for: the user accepts the mismatch
])
def test_recompute_old_logprobs(setting, rollout_bf16, learner_bf16, want):
    assert recompute_old_logprobs(setting, rollout_bf16, learner_bf16, overlap=False) is want


def test_overlap_rejects_recompute():
    assert recompute_old_logprobs("auto", False, False, overlap=True) is False
    assert recompute_old_logprobs(False, True, True, overlap=True) is False
    with pytest.raises(ConfigError, match="ppo_overlap_rollout.*auto recomputes them.*bf16"):
        recompute_old_logprobs("auto", True, True, overlap=True)
    with pytest.raises(ConfigError, match="ppo_overlap_rollout.*ppo_recompute_old_logprobs: true"):
        recompute_old_logprobs(True, False, False, overlap=True)


def test_config_checks(tiny, tmp_path):
    assert load_config(base_config(tiny, tmp_path)).bf16 == "auto"
    with pytest.raises(ConfigError, match="bf16: true needs a CUDA GPU, but device is cpu"):
        load_config(base_config(tiny, tmp_path, bf16=True))
    with pytest.raises(ConfigError, match="ppo_recompute_old_logprobs: true removes ppo_overlap_rollout"):
        load_config(base_config(tiny, tmp_path, ppo_recompute_old_logprobs=True, ppo_overlap_rollout=True))


def test_cli_bf16_without_a_gpu_fails_before_any_stage(tiny, tmp_path, capsys):
    """device: auto on this GPU-less machine, bf16: true: one line and exit 2, before SFT starts."""
    import json

    from rlhf_dist.cli.commands import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(base_config(tiny, tmp_path / "run", device="auto", bf16=True)))
    assert main(["sft", str(cfg), "cluster.num_cpus=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("rlhf-dist: error: bf16: true needs a CUDA GPU, but the run's device is cpu; use bf16: auto "
                       "(bf16 on GPUs, float32 elsewhere) or false")
    assert not (tmp_path / "run" / "sft").exists()
