import json
import re

import pytest

from rlhf_dist.config import ConfigError, load_config, redact

SEED_FIELDS = {
    "model_name": "m", "tokenizer_path": "m", "device": "cpu", "sft_data_path": "s.jsonl", "sft_epochs": 2,
    "sft_batch_size": 8, "sft_lr": 1e-4, "reward_data_path": "p.jsonl", "reward_epochs": 1, "reward_lr": 1e-5,
    "reward_batch_size": 8, "freeze_reward_backbone": True, "ppo_data_path": "q.jsonl", "ppo_iterations": 3,
    "ppo_lr_policy": 1e-6, "ppo_lr_value": 1e-5, "ppo_batch_size": 8, "ppo_mini_batch_size": 4, "ppo_epochs": 2,
    "max_length": 128, "save_dir": "out", "save_interval": 1, "log_level": "INFO",
}


def test_seed_field_names_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in SEED_FIELDS.items()))
    cfg = load_config(p)
    for k, v in SEED_FIELDS.items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize("bad, needle", [
    ({"sft_epochs": "two"}, "sft_epochs"),
    ({"sft_epochz": 1}, "sft_epochz"),
    ({"ppo_epochs": 0}, "ppo_epochs"),
    ({"device": "tpu"}, "device"),
    ({"roles": {"policy": {"num_gpus": -1}}}, "roles.policy.num_gpus"),
    ({"roles": {"critic": {"num_wrkers": 1}}}, "num_wrkers"),
    ({"ppo_batch_size": 10, "ppo_mini_batch_size": 4}, "ppo_batch_size"),
    ({"sft_batch_size": 6, "sft_workers": 4}, "sft_batch_size"),
    ({"gen_max_new_tokens": 600, "max_length": 512}, "gen_max_new_tokens"),
    ({"reward_fn": "not a function"}, "reward_fn"),
    ({"save_dir": "runs/../../etc"}, "save_dir"),
    ({"wandb": {"name": "../../x"}}, "wandb.name"),
    ({"wandb": {"group": "a/b"}}, "wandb.group"),
    ({"kl_max": 0}, "kl_max"),
    ({"sft_max_tokens_per_micro_batch": 0}, "sft_max_tokens_per_micro_batch"),
    ({"ppo_max_tokens_per_micro_batch": 512, "ppo_micro_batch_size": 4}, "ppo_max_tokens_per_micro_batch: set it"),
])
def test_bad_values_name_the_field(bad, needle):
    with pytest.raises(ConfigError) as e:
        load_config({**SEED_FIELDS, **bad})
    assert needle in str(e.value)


def test_missing_model_name():
    with pytest.raises(ConfigError, match="model_name"):
        load_config({})


def test_dotted_overrides_and_no_rewrite():
    cfg = load_config(SEED_FIELDS, ["wandb.mode=offline", "roles.policy.num_cpus=0.5", "ppo_epochs=3"])
    assert cfg.wandb.mode == "offline" and cfg.roles.policy.num_cpus == 0.5 and cfg.ppo_epochs == 3
    # Round trip: what was parsed is what is dumped, nothing rewritten.
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SEED_FIELDS, ["ppo_epochs"])


def test_redact_removes_env_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "canary-secret-123456")
    assert redact({"a": ["x canary-secret-123456 y"]}) == {"a": ["x *** y"]}


def test_cli_error_has_no_traceback(tmp_path, capsys):
    from rlhf_dist.cli.commands import main

    p = tmp_path / "c.yaml"
    p.write_text("model_name: m\nppo_epochs: -1\n")
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert "ppo_epochs" in err and "Traceback" not in err


def test_config_docs_are_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=root)
    assert r.returncode == 0, "docs/config.md is stale: run python scripts/gen_config_docs.py"


@pytest.mark.parametrize("kw, needle", [
    ({"algorithm": "grpo"}, "n_samples_per_prompt: grpo needs 2 or more samples per prompt, got 1"),
    ({"algorithm": "rloo", "n_samples_per_prompt": 2, "critic_init": "reward"},
     "critic_init: only used with algorithm: ppo (a critic); rloo starts none"),
    ({"algorithm": "grpo", "n_samples_per_prompt": 2, "roles": {"critic": {"num_workers": 2}}},
     "roles.critic: only used with algorithm: ppo"),
    ({"grpo_norm_std": False}, "grpo_norm_std: only used with algorithm: grpo"),
    ({"kl_estimator": "k3"}, "kl_estimator: k3 in the reward gives a biased KL gradient"),
    ({"kl_in": "loss", "kl_estimator": "k1"}, "kl_estimator: k1 as a loss term has zero expected gradient"),
    ({"n_samples_per_prompt": 3, "ppo_batch_size": 16, "ppo_mini_batch_size": 32},
     "ppo_mini_batch_size: ppo_batch_size (16) x n_samples_per_prompt (3) = 48 samples is not a multiple of 32"),
])
def test_algorithm_options_are_checked(kw, needle):
    from rlhf_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config({"model_name": "m", **kw})


def test_critic_free_plan_has_no_critic():
    from rlhf_dist.config import load_config
    from rlhf_dist.roles.placement import plan_placement

    _, slots = plan_placement(load_config({"model_name": "m", "algorithm": "rloo", "n_samples_per_prompt": 2}), 0, [2.0])
    assert sorted(s.role for s in slots) == ["policy", "reference", "reward", "rollout"]
    _, slots = plan_placement(load_config({"model_name": "m"}), 0, [2.0])
    assert "critic" in {s.role for s in slots}


@pytest.mark.parametrize("bad, needle", [
    ({"ppo_epochs": "2"}, "ppo_epochs: Expected `int`, got `str`"),
    ({"truncate": 1}, "truncate: Expected `bool`, got `int`"),
    ({"freeze_reward_backbone": "true"}, "freeze_reward_backbone: Expected `bool`, got `str`"),
    ({"seed": True}, "seed: Expected `int`, got `bool`"),
    ({"ppo_lr_policy": "1e-4"}, "ppo_lr_policy: Expected `float`, got `str`"),
    ({"bf16": "true"}, "bf16: Invalid enum value 'true', expected one of: auto, true, false"),
    ({"stages": ["sft", "rl"]}, "stages.1: Invalid enum value 'rl', expected one of: sft, reward, dpo, kto, ppo"),
])
def test_types_are_strict(bad, needle):
    with pytest.raises(ConfigError) as e:
        load_config({"model_name": "m", **bad})
    assert str(e.value) == f"invalid config: {needle}"


def test_int_fills_a_float_field():
    cfg = load_config({"model_name": "m", "ppo_lr_policy": 1, "roles": {"policy": {"num_gpus": 1}}})
    assert cfg.ppo_lr_policy == 1.0 and isinstance(cfg.ppo_lr_policy, float)
    assert isinstance(cfg.roles.policy.num_gpus, float)


def test_yaml_exponent_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 and 2E5 as strings; the loader reads them as floats.
    p = tmp_path / "c.yaml"
    p.write_text("model_name: m\nppo_lr_policy: 1e-4\nsft_lr: 2E-3\nreward_lr: 1.5e-5\ncall_timeout_s: 6e2\n"
                 "wandb: {name: 1e-4x, tags: [3e5x]}\n")
    cfg = load_config(p)
    assert (cfg.ppo_lr_policy, cfg.sft_lr, cfg.reward_lr, cfg.call_timeout_s) == (1e-4, 2e-3, 1.5e-5, 600.0)
    assert cfg.wandb.name == "1e-4x" and cfg.wandb.tags == ["3e5x"]  # not numbers: stay strings
    with pytest.raises(ConfigError, match="ppo_epochs: Expected `int`, got `float`"):
        load_config(p, ["ppo_epochs=1e2"])


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config(SEED_FIELDS, ["ppo_lr_policy=1e-4", "bf16=false", "truncate=false", "wandb.tags=[a,b]",
                                    "sft_lr=2", "roles.policy.num_gpus=0", "wandb.name=run1", "seed=7"])
    assert (cfg.ppo_lr_policy, cfg.bf16, cfg.truncate, cfg.wandb.tags) == (1e-4, False, False, ["a", "b"])
    assert load_config({"model_name": "m"}, ["bf16=true"]).bf16 is True
    assert (cfg.sft_lr, cfg.roles.policy.num_gpus, cfg.wandb.name, cfg.seed) == (2.0, 0.0, "run1", 7)
    with pytest.raises(ConfigError, match="truncate: Expected `bool`, got `int`"):
        load_config(SEED_FIELDS, ["truncate=1"])
    with pytest.raises(ConfigError, match="sft_epochs: Expected `int`, got `str`"):
        load_config(SEED_FIELDS, ["sft_epochs=two"])
