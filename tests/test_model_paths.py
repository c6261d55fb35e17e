"""Bring your own models: explicit *_model_path fields instead of the stage outputs (which `run` then skips),
a reward model with its own tokenizer, manifests checked before a stage output is read, and
save_total_limit. Pure functions and single-process checks first; one short Ray run at the end."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import base_config

from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.data.encode import encode_prompt, encode_prompt_response
from rlhf_dist.io.checkpoint import (
    CheckpointError,
    atomic_dir,
    iterations_to_remove,
    mark_stage_finished,
    prune_iterations,
    verify,
)
from rlhf_dist.io.sources import check_model_paths
from rlhf_dist.models.load import load_causal_lm, load_scalar_model, load_tokenizer, save_hf, sequence_scores
from rlhf_dist.roles.actors import RewardWorker, RoleWorker
from rlhf_dist.rollout.decode import generate

pytestmark = pytest.mark.timeout(600)

TEXTS = ["Hi", "Describe the cat.", "What do you think of this movie? Tell me more.", "Park?", "Good"]
# The tiny template with other role markers: same vocabulary, other tokens for the same conversation.
OTHER_TEMPLATE = ("{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}"
                  "<|end|>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def rms(tiny, tmp_path_factory):
    """Untrained reward models (a fresh score head on a tiny backbone), saved as plain HF directories:
    `vocab` has a tokenizer of its own (another seed and vocabulary size), `template` the policy's
    vocabulary with another chat template, `same` the policy's tokenizer."""
    from rlhf_dist.demo.tiny import build_tiny

    root = tmp_path_factory.mktemp("rms")
    other = build_tiny(root / "other", seed=1, vocab_size=384, hidden_size=32, num_layers=1, intermediate_size=64)
    out = {}
    for kind, src in (("vocab", other["model"]), ("template", tiny["model"]), ("same", tiny["model"])):
        tok = load_tokenizer(str(src))
        if kind == "template":
            tok.chat_template = OTHER_TEMPLATE
        torch.manual_seed(0)
        save_hf(load_scalar_model(str(src), pad_token_id=tok.pad_token_id), tok, root / kind)
        out[kind] = str(root / kind)
    return out


def seal(src: str | Path, best_model: Path) -> Path:
    """Copy an HF directory in as a finished stage's best_model (manifest, COMPLETE, stage marker)."""
    with atomic_dir(best_model) as tmp:
        for f in Path(src).iterdir():
            shutil.copy(f, tmp / f.name)
    mark_stage_finished(best_model)
    return best_model


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _plain_init(self, role, rank, config, num_cpus, device):
    """RoleWorker's fields without Ray, log files or thread settings."""
    self.cfg, self.role, self.rank = load_config(config), role, rank
    self.device, self.bf16, self.version = torch.device("cpu"), False, 0


# ---------------------------------------------------------------------------------------
# Config: the effective stage list, field checks
# ---------------------------------------------------------------------------------------

def test_given_outputs_skip_their_stages():
    def stages(**kw):
        return load_config({"model_name": "x", **kw}).run_stages()

    assert stages() == ("sft", "reward", "ppo")
    assert stages(policy_model_path="p") == ("reward", "ppo")
    assert stages(reward_model_path="r") == ("sft", "ppo")
    assert stages(policy_model_path="p", reward_model_path="r") == ("ppo",)
    assert stages(stages=["sft", "reward", "ppo"], reward_model_path="r") == ("sft", "ppo")
    assert stages(stages=["sft", "dpo"], policy_model_path="p") == ("dpo",)
    # ppo needs no reward stage before it when the reward model is given
    assert stages(stages=["sft", "ppo"], reward_model_path="r") == ("sft", "ppo")
    with pytest.raises(ConfigError, match="reward must come before ppo"):
        stages(stages=["sft", "ppo"])
    cfg = load_config({"model_name": "x", "policy_model_path": "p"})
    assert cfg.policy_model_path == "p" and cfg.stages is None  # nothing rewritten


@pytest.mark.parametrize("kw, needle", [
    ({"algorithm": "grpo", "n_samples_per_prompt": 2, "critic_model_path": "c"}, "critic_model_path: only used with"),
    ({"critic_model_path": "c", "critic_init": "reward"}, "critic_init: reward is not used when critic_model_path"),
])
def test_critic_model_path_checks(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({"model_name": "x", **kw})


def test_missing_model_dir_is_an_error_naming_the_field(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    def check(**kw):
        check_model_paths(load_config(base_config(tiny, tmp_path / "run", **kw)))

    with pytest.raises(ConfigError, match=r"reward_model_path: directory .*nope does not exist"):
        check(reward_model_path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"policy_model_path: .* is not a Hugging Face model directory"):
        check(policy_model_path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"critic_model_path: .* is a file"):
        check(critic_model_path=str(tiny["sft"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check(reference_model_path="org/model", policy_model_path=str(tiny["model"]))  # a hub id, where there is a hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"reference_model_path: org/model is not a local directory, and the hub is off"):
        check(reference_model_path="org/model")


def test_pipeline_checks_model_paths_before_ray(tiny, tmp_path):
    import ray

    from rlhf_dist.pipeline import create_rlhf_pipeline

    pipe = create_rlhf_pipeline(base_config(tiny, tmp_path / "run", policy_model_path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="policy_model_path: directory"):
        pipe.run_full_pipeline()
    assert not ray.is_initialized()


def test_run_and_its_placement_check_skip_given_stages(tiny, rms, tmp_path, monkeypatch, caplog):
    """The placement pre-check sees the stages `run` runs: without sft (and reward) when their output is given."""
    import rlhf_dist.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "ray_session", lambda cfg: contextlib.nullcontext())
    monkeypatch.setattr(pipeline.RLHFPipeline, "_device", lambda self: "cpu")
    monkeypatch.setattr("rlhf_dist.roles.placement.check_cluster", lambda cfg, st, dev: calls.append(("check", st)))
    monkeypatch.setattr("rlhf_dist.offline.job.run_supervised", lambda cfg, st, dev: calls.append(st) or Path(st))
    monkeypatch.setattr("rlhf_dist.online.driver.run_ppo", lambda cfg, dev: calls.append("ppo") or Path("ppo"))
    caplog.set_level(logging.INFO, logger="rlhf_dist")
    base = dict(sft_data_path=None, policy_model_path=str(tiny["model"]))
    out = pipeline.create_rlhf_pipeline(base_config(tiny, tmp_path / "a", **base)).run_full_pipeline()
    assert calls == [("check", ("reward", "ppo")), "reward", "ppo"] and list(out) == ["reward", "ppo"]
    assert f"sft: not run, policy_model_path gives its output ({tiny['model']})" in caplog.text
    calls.clear()
    cfg = base_config(tiny, tmp_path / "b", reward_data_path=None, reward_model_path=rms["vocab"], **base)
    assert list(pipeline.create_rlhf_pipeline(cfg).run_full_pipeline()) == ["ppo"]
    assert calls == [("check", ("ppo",)), "ppo"]


# ---------------------------------------------------------------------------------------
# Which model each role loads
# ---------------------------------------------------------------------------------------

def test_explicit_paths_replace_stage_outputs(tiny, rms, tmp_path, caplog):
    from rlhf_dist.online.setup import resolve_inputs

    save = tmp_path / "run"
    sft = seal(tiny["model"], save / "sft" / "best_model")
    seal(rms["same"], save / "reward_model" / "best_model")
    ref = shutil.copytree(tiny["model"], tmp_path / "ref")
    caplog.set_level(logging.INFO, logger="rlhf_dist")
    cfg = load_config(base_config(tiny, save, policy_model_path=str(tiny["model"]), reference_model_path=str(ref),
                                  reward_model_path=rms["vocab"], critic_model_path=rms["same"]))
    inp = resolve_inputs(cfg, None)
    assert (inp.policy, inp.reference, inp.reward, inp.critic) == (str(tiny["model"]), str(ref), rms["vocab"],
                                                                   rms["same"])
    assert inp.tokenizer == str(tiny["model"])
    lines = [r.getMessage() for r in caplog.records if " loads " in r.getMessage()]
    assert lines == [f"ppo: rollout loads {tiny['model']} (policy_model_path)",
                     f"ppo: policy loads {tiny['model']} (policy_model_path)",
                     f"ppo: critic loads {rms['same']} (critic_model_path)",
                     f"ppo: reference loads {ref} (reference_model_path)",
                     f"ppo: reward loads {rms['vocab']} (reward_model_path)"]
    # Unset: the stage outputs; the reference and the critic (critic_init sft) follow the policy's start.
    inp = resolve_inputs(load_config(base_config(tiny, save)), None)
    assert (inp.policy, inp.reference, inp.critic) == (str(sft),) * 3
    assert inp.reward == str(save / "reward_model" / "best_model")
    # A resumed run's learners start from the iteration; the reference stays.
    it = save / "ppo" / "iteration_000002"
    inp = resolve_inputs(load_config(base_config(tiny, save)), it)
    assert (inp.policy, inp.critic, inp.reference) == (str(it / "policy"), str(it / "critic"), str(sft))


def test_critic_init_reward_starts_the_critic_from_the_reward_model(tiny, rms, tmp_path):
    from rlhf_dist.online.setup import resolve_inputs

    save = tmp_path / "run"
    seal(tiny["model"], save / "sft" / "best_model")
    rm = seal(rms["same"], save / "reward_model" / "best_model")
    inp = resolve_inputs(load_config(base_config(tiny, save, critic_init="reward")), None)
    assert inp.critic == inp.reward == str(rm)
    # Also without scoring with it (reward_model_weight 0): the critic still starts from it.
    inp = resolve_inputs(load_config(base_config(tiny, save, critic_init="reward", reward_model_weight=0,
                                                 reward_fn="rlhf_dist.demo:positivity_reward")), None)
    assert inp.critic == str(rm) and inp.reward is None
    inp = resolve_inputs(load_config(base_config(tiny, save, critic_init="reward", reward_model_path=rms["same"])), None)
    assert inp.critic == rms["same"]
    # The critic reads the policy's tokens: a reward model with another vocabulary cannot be its start.
    with pytest.raises(ConfigError, match="critic_init: the critic's start .* another vocabulary"):
        resolve_inputs(load_config(base_config(tiny, save, critic_init="reward", reward_model_path=rms["vocab"])), None)
    with pytest.raises(ConfigError, match="critic_model_path: the critic's start .* another vocabulary"):
        resolve_inputs(load_config(base_config(tiny, save, critic_model_path=rms["vocab"])), None)


@pytest.mark.parametrize("kind", ["vocab", "template"])
def test_reward_model_with_its_own_tokenizer_scores_the_text(kind, tiny, rms, monkeypatch):
    """RewardWorker (its own __init__, without Ray): scores equal the reward model's scores of the decoded
    responses, re-encoded with the reward model's own tokenizer and chat template."""
    monkeypatch.setattr(RoleWorker, "__init__", _plain_init)
    config = {"model_name": "x", "device": "cpu", "gen_max_new_tokens": 10, "ppo_forward_micro_batch_size": 2}
    w = RewardWorker(0, config, 1.0, "cpu", rms[kind], str(tiny["model"]))
    assert not w.sources.sources["model"].same_tokens
    ptok, lm = load_tokenizer(str(tiny["model"])), load_causal_lm(str(tiny["model"])).eval()
    prompts = [[{"role": "user", "content": t}] for t in TEXTS]
    samples = generate(lm, [encode_prompt(ptok, p) for p in prompts], pad_id=ptok.pad_token_id,
                       eos_id=ptok.eos_token_id, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    out = w.score(samples, prompts, [{}] * len(prompts))
    assert out.responses == [ptok.decode(r[m.bool()], skip_special_tokens=True)
                                for r, m in zip(samples.responses, samples.action_mask)]
    rtok = load_tokenizer(rms[kind])
    rm = load_scalar_model(rms[kind], pad_token_id=rtok.pad_token_id).eval()
    want = []
    for p, r in zip(prompts, out.responses):
        ids = encode_prompt_response(rtok, p, r).input_ids
        assert ids != encode_prompt_response(ptok, p, r).input_ids  # other tokens for the same text
        with torch.no_grad():
            want.append(sequence_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
    torch.testing.assert_close(out.sources["model"].scores, torch.cat(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.score, torch.cat(want), atol=1e-5, rtol=1e-5)  # reward_model_weight 1


# ---------------------------------------------------------------------------------------
# Manifests before reading
# ---------------------------------------------------------------------------------------

def test_corrupted_stage_output_fails_before_reading(tiny, rms, tmp_path):
    from rlhf_dist.evaluation.evaluate import eval_models, verify_checkpoint
    from rlhf_dist.offline.job import input_model_dir
    from rlhf_dist.online.setup import resolve_inputs

    save = tmp_path / "run"
    sft = seal(tiny["model"], save / "sft" / "best_model")
    rm = seal(rms["same"], save / "reward_model" / "best_model")
    cfg = load_config(base_config(tiny, save))
    assert input_model_dir(cfg, "dpo") == (str(sft), "the SFT checkpoint")
    for best in (sft, rm):
        good = (best / "model.safetensors").read_bytes()
        flip_byte(best / "model.safetensors")
        bad = rf"{best / 'model.safetensors'}: sha256 mismatch"
        with pytest.raises(CheckpointError, match=bad):
            resolve_inputs(cfg, None)
        with pytest.raises(CheckpointError, match=bad):
            eval_models(cfg, [])
        if best == sft:  # the reward and DPO stages read the SFT model
            for stage in ("reward", "dpo"):
                with pytest.raises(CheckpointError, match=bad):
                    input_model_dir(cfg, stage)
            with pytest.raises(CheckpointError, match=bad):
                verify_checkpoint(str(best))
        (best / "model.safetensors").write_bytes(good)
    # A sealed directory given as an explicit path is verified too.
    flip_byte(rm / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 mismatch"):
        resolve_inputs(load_config(base_config(tiny, tmp_path / "other", policy_model_path=str(sft),
                                               reward_model_path=str(rm))), None)


def test_eval_verifies_only_an_iterations_policy(tmp_path):
    from rlhf_dist.evaluation.evaluate import verify_checkpoint

    it = tmp_path / "iteration_000002"
    with atomic_dir(it) as tmp:
        for sub in ("policy", "policy_engine"):
            (tmp / sub).mkdir()
            (tmp / sub / "w.bin").write_bytes(b"x" * 10)
    flip_byte(it / "policy_engine" / "w.bin")
    verify_checkpoint(str(it / "policy"))  # the optimizer states are not read by eval
    with pytest.raises(CheckpointError, match="policy_engine/w.bin"):
        verify(it)
    flip_byte(it / "policy" / "w.bin")
    with pytest.raises(CheckpointError, match="policy/w.bin: sha256 mismatch"):
        verify_checkpoint(str(it / "policy"))


# ---------------------------------------------------------------------------------------
# save_total_limit
# ---------------------------------------------------------------------------------------

def test_iterations_to_remove_keep_the_newest():
    its = [Path(f"ppo/iteration_{i:06d}") for i in (2, 4, 6, 8)]
    assert iterations_to_remove(its, None) == []
    assert iterations_to_remove(its, 2) == its[:2]
    assert iterations_to_remove(its, 1) == its[:3]  # never the newest
    assert iterations_to_remove(its, 4) == iterations_to_remove(its, 9) == []
    assert iterations_to_remove(its, 1, writing=its[1]) == [its[0], its[2]]  # never the one being written
    assert iterations_to_remove([], 1) == []


def test_prune_iterations_deletes_and_logs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf_dist")
    for i in (1, 2, 3):
        with atomic_dir(tmp_path / f"iteration_{i:06d}") as tmp:
            (tmp / "state.json").write_text("{}")
    (tmp_path / "iteration_000004").mkdir()  # incomplete: not counted, not touched
    gone = prune_iterations(tmp_path, 1)
    assert [p.name for p in gone] == ["iteration_000001", "iteration_000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration_000003", "iteration_000004"]
    assert caplog.text.count("removed checkpoint") == 2 and "save_total_limit: 1" in caplog.text
    assert prune_iterations(tmp_path, None) == []


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_with_own_models_and_save_total_limit(tiny, rms, tmp_path, local_ray):
    """`run` with a given policy and a reward model of another tokenizer: only ppo runs, each role's model is
    logged, the reward model re-tokenises, and only the last 2 iterations stay (saved every iteration)."""
    from conftest import iteration_rows

    from rlhf_dist.pipeline import create_rlhf_pipeline

    save = tmp_path / "run"
    cfg = base_config(tiny, save, sft_data_path=None, reward_data_path=None, policy_model_path=str(tiny["model"]),
                      reward_model_path=rms["vocab"], ppo_iterations=3, ppo_batch_size=8, ppo_mini_batch_size=8,
                      gen_max_new_tokens=8, save_interval=1, save_total_limit=2)
    out = create_rlhf_pipeline(cfg).run_full_pipeline()
    assert list(out) == ["ppo"]
    assert not (save / "sft").exists() and not (save / "reward_model").exists()
    assert sorted(p.name for p in (save / "ppo").glob("iteration_*")) == ["iteration_000002", "iteration_000003"]
    log = (save / "logs" / "run.log").read_text()
    assert f"removed checkpoint {save / 'ppo' / 'iteration_000001'} (save_total_limit: 2)" in log
    assert f"ppo: reward loads {rms['vocab']} (reward_model_path)" in log
    assert f"ppo: critic loads {tiny['model']} (critic_init sft: policy_model_path)" in log
    assert "different tokenizer: re-tokenising text" in log
    assert all(r["rm_score"] is not None for r in iteration_rows(save))
