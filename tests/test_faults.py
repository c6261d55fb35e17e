"""PPO under faults: killed actors and learners, hangs, and the health guards.

Faults are real: `faults.install` runs in every Ray worker and SIGKILLs the process, hangs it, or makes
a loss NaN at a chosen call. Recovered runs must end where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import base_config, fault_hooked_ray, iteration_rows
from safetensors.torch import load_file

from rlhf_dist.io.checkpoint import CheckpointError
from rlhf_dist.online.driver import run_ppo
from rlhf_dist.online.health import HealthError
from rlhf_dist.runtime.errors import PhaseTimeout, RoleFailure

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def fault_ray(tmp_path_factory):
    with fault_hooked_ray(tmp_path_factory.mktemp("faults")) as plan:
        yield plan


def ppo_config(tiny, save_dir, **kw):
    from rlhf_dist.config import load_config

    kw = {"ppo_iterations": 4, "save_interval": 2, "ppo_batch_size": 8, "ppo_mini_batch_size": 4,
          "gen_max_new_tokens": 8, "ppo_lr_policy": 5e-4, "reward_fn": "rlhf_dist.demo:positivity_reward",
          "reward_model_weight": 0.0, **kw}
    return load_config(base_config(tiny, save_dir, **kw))


def run(plan, tiny, save_dir, fault_list, **kw):
    faults.plan(plan, fault_list)
    logging.getLogger("rlhf_dist").setLevel(logging.INFO)
    t = time.time()
    try:
        return run_ppo(ppo_config(tiny, save_dir, **kw), "cpu")
    finally:
        print(f"{save_dir.name}: {time.time() - t:.1f}s")


@pytest.fixture(scope="module")
def baseline(fault_ray, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    run(fault_ray, tiny, out, [])
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = iteration_rows(a), iteration_rows(b)
    for r in ra + rb:  # old logprobs from the rollout: the first mini-batch is exactly on-policy
        assert abs(r["first_ratio_mean"] - 1) < 1e-4 and r["first_ratio_dev_max"] < 1e-4, r["iteration"]
    assert [r["iteration"] for r in rb] == [1, 2, 3, 4]  # each iteration logged once: nothing applied twice
    for x, y in zip(ra, rb):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "weight_version"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["iteration"], key)
    wa = load_file(a / "ppo" / "final_model" / "model.safetensors")
    wb = load_file(b / "ppo" / "final_model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_killed_actors_and_learner_recover(fault_ray, tiny, tmp_path, baseline, caplog):
    """Rollout, reference and reward actors SIGKILLed mid-iteration are restarted and the iteration redone;
    a SIGKILLed policy learner makes the run reload iteration_000002. The end state equals the baseline."""
    kills = [{"target": "rlhf_dist.roles.actors:RolloutWorker.generate", "call": 2, "action": "kill"},  # iteration 2
             {"target": "rlhf_dist.roles.actors:ReferenceWorker.logprobs", "call": 2, "action": "kill"},  # iteration 2
             {"target": "rlhf_dist.roles.actors:RewardWorker.score", "call": 3, "action": "kill"},  # 2, on the redo
             {"target": "rlhf_dist.roles.learner:Learner.train", "call": 3, "action": "kill"}]  # iteration 3
    run(fault_ray, tiny, tmp_path, kills)
    assert_same_run(baseline, tmp_path)
    rows = iteration_rows(tmp_path)
    for name, d in (("baseline", baseline), ("faulted", tmp_path)):
        print(name, "s/iteration:", [round(r["seconds"], 2) for r in iteration_rows(d)])
    assert rows[1]["actor_restarts"] == 3 and rows[1]["learner_restarts"] == 0
    assert rows[-1]["actor_restarts"] == 3 and rows[-1]["learner_restarts"] == 1
    text = caplog.text
    print("\n".join(line for line in text.splitlines() if "back in" in line or "resumed at" in line))
    for line in ("rollout-0 restarted after dying during phase 'experience'",
                 "reference-0 restarted after dying during phase 'experience'",
                 "reward-0 restarted after dying during phase 'experience'",
                 "reloading the last complete checkpoint (learner restart 1 of 2)", "resuming from"):
        assert line in text, line


def test_disk_full_during_save_then_resume(fault_ray, tiny, tmp_path, baseline):
    """The policy's second save (iteration 4) hits ENOSPC: a clear error with the path, no temp files
    left, and running again resumes from iteration_000002 to the baseline's end state."""
    full = [{"target": "rlhf_dist.models.load:save_hf", "call": 2, "action": "enospc"}]
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*iteration_000004: No space left on "
                                              r"device \(temporary files removed; the previous checkpoint is kept\)"):
        run(fault_ray, tiny, tmp_path, full)
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["iteration_000002", "metrics.jsonl",
                                                                    "samples.jsonl"]
    run(fault_ray, tiny, tmp_path, [])
    assert_same_run(baseline, tmp_path)


def test_hang_in_sync_times_out(fault_ray, tiny, tmp_path):
    hang = [{"target": "rlhf_dist.roles.actors:RolloutWorker.receive_weights", "call": 1, "action": "hang"}]
    t = time.time()
    with pytest.raises((PhaseTimeout, RoleFailure), match=r"rollout.*'sync'|sync.*timed out"):
        run(fault_ray, tiny, tmp_path, hang, sync_timeout_s=4.0, ppo_iterations=1)
    assert time.time() - t < 120


def test_hang_in_remote_call_times_out(fault_ray, tiny, tmp_path):
    """A hung call fails after call_timeout_s; a learner's setup slower than that is still waited for
    (setup_timeout_s)."""
    hang = [{"target": "rlhf_dist.roles.learner:Learner.setup", "call": 1, "action": "delay", "seconds": 12},
            {"target": "rlhf_dist.roles.actors:RewardWorker.score", "call": 1, "action": "hang"}]
    with pytest.raises(PhaseTimeout, match=r"reward: phase 'experience' timed out after 10s"):
        run(fault_ray, tiny, tmp_path, hang, call_timeout_s=10.0, setup_timeout_s=120.0, ppo_iterations=1)


def test_nonfinite_loss_and_reward_skip_the_update(fault_ray, tiny, tmp_path, caplog):
    """A NaN policy loss (iteration 1) and NaN rewards (iteration 3) skip those updates; the run goes on
    and no non-finite weight is saved."""
    nan = [{"target": "rlhf_dist.steps.update:policy_loss", "call": 1, "action": "nan"}]
    run(fault_ray, tiny, tmp_path, nan, reward_fn="faults_rewards:positivity_or_nan")
    rows = iteration_rows(tmp_path)
    assert [r.get("skipped", 0) for r in rows] == [1, 0, 1, 0]
    assert rows[-1]["bad_steps"] == 2
    text = caplog.text
    assert "1 optimizer steps skipped for a non-finite gradient norm, non-finite loss on sample ids [" in text
    assert "non-finite scores (sample ids [" in text
    for f in ("final_model/model.safetensors", "iteration_000004/policy/model.safetensors"):
        for k, v in load_file(tmp_path / "ppo" / f).items():
            assert torch.isfinite(v).all(), (f, k)


def test_kl_hard_stop_keeps_last_good_checkpoint(fault_ray, tiny, tmp_path, caplog):
    with pytest.raises(HealthError, match=r"KL .* > kl_max 1e-06 at iteration 2.*iteration_000001"):
        run(fault_ray, tiny, tmp_path, [], kl_max=1e-6, save_interval=1)
    assert not (tmp_path / "ppo" / "iteration_000002").exists()
    assert "ppo: stopped: ppo: KL" in caplog.text


def test_overlapped_rollout_lags_one_step_and_recovers(fault_ray, tiny, tmp_path, caplog):
    """ppo_overlap_rollout: iteration k+1's rollout runs during iteration k's update, on the weights from
    before it (rollout_lag 1), and the rollout's logprobs make PPO's ratio correct for that. A rollout worker
    SIGKILLed in such a rollout is restarted and the rollout redone on current weights (lag 0 there), and a
    checkpoint leaves the prompts of a rollout started ahead unconsumed."""
    kill = [{"target": "rlhf_dist.roles.actors:RolloutWorker.generate", "call": 2, "action": "kill"}]  # iteration 2's
    run(fault_ray, tiny, tmp_path, kill, ppo_overlap_rollout=True)
    rows = iteration_rows(tmp_path)
    assert [r["rollout_lag"] for r in rows] == [0, 0, 1, 1]
    assert [r["weight_version"] - r["rollout_version"] for r in rows] == [1, 1, 2, 2]
    for r in rows:  # the first mini-batch is on-policy only where the rollout was
        assert (r["first_ratio_dev_max"] < 1e-4) == (r["rollout_lag"] == 0), r
    assert rows[-1]["actor_restarts"] == 1
    assert "rollout-0 restarted after dying during phase 'rollout'" in caplog.text
    for it in (2, 4):
        state = json.loads((tmp_path / "ppo" / f"iteration_{it:06d}" / "state.json").read_text())
        assert state["cursor"] == it * 8
    start = load_file(Path(tiny["model"]) / "model.safetensors")
    final = load_file(tmp_path / "ppo" / "final_model" / "model.safetensors")
    assert all(not torch.equal(start[k], final[k]) for k in start)
