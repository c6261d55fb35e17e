"""A driver SIGKILLed mid-SFT and mid-save, after two PPO updates that no checkpoint holds; each time
the same command resumes (this is also the test that PPO and SFT resume is exact).
The run that crashed twice ends with the same SFT model, PPO metrics and PPO weights as a run that
never crashed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import base_config, iteration_rows
from safetensors.torch import load_file

from rlhf_dist.io.tracking import read_metrics

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
TESTS = Path(__file__).parent


def start(cfg_path: Path, fault: str | None) -> tuple[int, float]:
    """Run the driver in its own process group; after it exits, kill whatever of that group is left."""
    cmd = [sys.executable, str(TESTS / "fault_driver.py"), str(cfg_path), fault] if fault else \
        [sys.executable, "-m", "rlhf_dist.cli.commands", "run", str(cfg_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not a cluster
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test created, and nothing else
        except ProcessLookupError:
            pass
    return rc, time.time() - t


def write_config(tiny, save_dir: Path) -> Path:
    # Small SFT batches, two epochs: 540 steps (about 10 s), so that the kill, which waits for Ray Train to
    # register a checkpoint (seconds after its report), lands mid-SFT. With 270 steps it once landed just
    # after epoch 1's best_model save, and the rerun wrongly took SFT as finished (now: stage_complete.json).
    cfg = base_config(tiny, save_dir, sft_epochs=2, sft_batch_size=4, train_save_steps=50, ppo_iterations=4,
                      save_interval=2, ppo_batch_size=8, ppo_mini_batch_size=4, gen_max_new_tokens=8,
                      ppo_lr_policy=5e-4, reward_fn="rlhf_dist.demo:positivity_reward", reward_model_weight=0.0,
                      cluster={"num_cpus": 2}, wandb={"mode": "disabled"})
    path = save_dir.parent / f"{save_dir.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_driver_killed_twice_resumes_exactly(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, secs = start(write_config(tiny, a), None)
    assert rc == 0
    print(f"uninterrupted: {secs:.1f}s")

    cfg_b = write_config(tiny, b)
    # The mid-save kill lands after iterations 3 and 4 have updated the learners, before any of that is
    # saved: the resumed run must redo both updates exactly once.
    for fault in ("sft-checkpoint", "mid-save:iteration_000004"):
        rc, secs = start(cfg_b, fault)
        assert rc == -signal.SIGKILL, fault
        print(f"killed at {fault}: {secs:.1f}s")
        if fault == "mid-save:iteration_000004":
            ppo_dir = b / "ppo"
            assert not (ppo_dir / "iteration_000004").exists()  # no partial file under a final name
            assert list(ppo_dir.glob(".iteration_000004.tmp-*"))
            assert (ppo_dir / "iteration_000002" / "COMPLETE").is_file()
    rc, secs = start(cfg_b, None)
    assert rc == 0
    print(f"final rerun: {secs:.1f}s")

    log = (b / "logs" / "run.log").read_text()
    assert "sft: resuming from Ray Train checkpoint" in log
    assert log.count("ppo: resuming from") == 1  # after the mid-save kill
    assert "left by an interrupted save" in log
    assert not list((b / "ppo").glob(".iteration_*"))

    for rel in ("sft/best_model/model.safetensors", "ppo/final_model/model.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{rel} {k}")
    ra, rb = iteration_rows(a), iteration_rows(b)
    assert [r["iteration"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "weight_version"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["iteration"], key)
    sa = [r for r in read_metrics(a / "sft" / "metrics.jsonl") if "loss" in r]
    sb = [r for r in read_metrics(b / "sft" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in sb] == [r["step"] for r in sa]
    for x, y in zip(sa, sb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
