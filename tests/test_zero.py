"""PPO end to end under ZeRO-1, 2 and 3, each with 2 policy and 2 critic learner workers (gloo, CPU).

Under ZeRO-3 each learner holds only a partition of each parameter over DeepSpeed's persistence threshold
(1e5 elements; smaller ones stay whole): the weight sync gathers each bucket, the health check reads the
partitions, and the saves consolidate them. The model here is wide enough (hidden 256) for its embedding
and head to be partitioned, so each forward gathers them, a collective; the `tiny` model has no such
parameter. The rollout's logprobs are checked
against the learner's recomputed ones every iteration, so a sync that sent nothing would show.

The ZeRO-3 run packs its micro-batches (ppo_max_tokens_per_micro_batch: 32, about one sample each, so the
ranks plan different counts and must agree on one: ZeRO-3 forwards are collectives), and still agrees with
the padded ZeRO-1 and ZeRO-2 runs on the first iteration's losses. A second ZeRO-3 run crashes while saving
its last iteration, after that iteration's update, and resumes from the checkpoint before it: it must end
where the uninterrupted run ends (DeepSpeed's partitioned weights and Adam moments round-trip).
"""

import contextlib
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import base_config, iteration_rows
from safetensors.torch import load_file

from rlhf_dist.config import load_config
from rlhf_dist.io.checkpoint import is_complete
from rlhf_dist.online.driver import run_ppo

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

ROLES = {"rollout": {"num_cpus": 0.25}, "reference": {"num_cpus": 0.25}, "reward": {"num_cpus": 0.25},
         "policy": {"num_workers": 2, "num_cpus": 0.25}, "critic": {"num_workers": 2, "num_cpus": 0.25}}


def config(assets, save, stage: int):
    return load_config(base_config(
        assets, save, zero_stage=stage, ppo_iterations=3, save_interval=2, ppo_batch_size=8,
        ppo_mini_batch_size=4, gen_max_new_tokens=8, ppo_lr_policy=5e-4, reward_fn="rlhf_dist.demo:positivity_reward",
        reward_model_weight=0.0, ppo_recompute_old_logprobs=True, roles=ROLES,
        ppo_max_tokens_per_micro_batch=32 if stage == 3 else None))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from rlhf_dist.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("wide"), seed=0, hidden_size=256, num_layers=1, intermediate_size=256)


class Crash(Exception):
    """The driver dying mid-save, in this process."""


@contextlib.contextmanager
def crash_while_saving(name: str):
    """Within, the driver raises `Crash` while writing checkpoint `name`: its weights and optimizer states are
    written, its state.json is not (as tests/fault_driver.py's mid-save kill)."""
    from rlhf_dist.online import setup

    write = setup.write_json_atomic

    def write_or_crash(path, obj):
        if Path(path).parent.name.startswith(f".{name}.tmp-"):
            raise Crash(name)
        return write(path, obj)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setup, "write_json_atomic", write_or_crash)
        yield


@contextlib.contextmanager
def driver_log():
    """Within, the driver's log messages (INFO and up) are collected into the yielded list."""
    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    lines: list[str] = []
    logger, handler = logging.getLogger("rlhf_dist.online.driver"), Collect()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def runs(wide, tmp_path_factory, local_ray):
    """Run directories of ZeRO stages 2 and 3, and "3-resumed"; "resume_log": the rerun's driver log.
    (Stage 1 partitions only the optimizer states, a subset of what stage 2 does: not run, to save suite time.)"""
    out = {}
    for stage in (2, 3):
        out[stage] = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        run_ppo(config(wide, out[stage], stage), "cpu")
    # Crashed after iteration 3's update, before its checkpoint: the rerun resumes from iteration 2.
    out["3-resumed"] = tmp_path_factory.mktemp("zero3-resumed") / "run"
    with crash_while_saving("iteration_000003"), pytest.raises(Crash):
        run_ppo(config(wide, out["3-resumed"], 3), "cpu")
    with driver_log() as out["resume_log"]:
        run_ppo(config(wide, out["3-resumed"], 3), "cpu")
    return out


@pytest.mark.parametrize("stage", [2, 3, "3-resumed"])
def test_ppo_trains_and_syncs(runs, wide, stage):
    save = runs[stage]
    rows = iteration_rows(save)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout_logprob_diff"] < 1e-3, r  # the rollout holds the learner's weights: the sync worked
        assert abs(r["first_ratio_mean"] - 1) < 1e-4 and r.get("skipped") is None
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    start = load_file(wide["model"] / "model.safetensors")
    final = load_file(save / "ppo" / "final_model" / "model.safetensors")
    assert final.keys() == start.keys()  # full tensors, not ZeRO-3's empty partitions
    for k in start:
        assert final[k].shape == start[k].shape
    assert sum(not torch.equal(start[k], final[k]) for k in start) > len(start) // 2
    for d in ("iteration_000002", "iteration_000003"):
        assert is_complete(save / "ppo" / d)
    assert json.loads((save / "ppo" / "iteration_000003" / "state.json").read_text())["version"] == 3


def test_stages_agree_on_the_first_iteration(runs):
    """The same math under every stage: iteration 1 (the same weights and samples) gives the same losses."""
    first = {s: iteration_rows(runs[s])[0] for s in (2, 3)}
    for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
        assert first[3][key] == pytest.approx(first[2][key], rel=1e-4, abs=1e-5), key


def test_a_resumed_zero3_run_ends_where_the_uninterrupted_one_does(runs):
    """Iteration 3 redone from iteration 2's checkpoint: the same metrics and final weights, policy and critic.
    A resume that lost Adam's moments takes another step in iteration 3, and differs here."""
    a, b = runs[3], runs["3-resumed"]
    resumed = [m for m in runs["resume_log"] if m.startswith("ppo: resuming from")]
    assert len(resumed) == 1 and resumed[0].endswith("iteration_000002 (iteration 2)"), resumed
    rows_a, rows_b = iteration_rows(a), iteration_rows(b)
    assert [r["iteration"] for r in rows_b] == [1, 2, 3]
    for x, y in zip(rows_a, rows_b):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "grad_norm", "weight_version"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["iteration"], key)
    for rel in ("final_model/model.safetensors", "final_model/critic/model.safetensors"):
        wa, wb = load_file(a / "ppo" / rel), load_file(b / "ppo" / rel)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{rel} {k}")
